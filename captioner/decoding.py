"""Turn image features into word ids: greedy, beam search and sampling, batched over images.

Every decoding step is one call of the compiled decoder step for all images (and all beams)
at once; the bookkeeping between steps is vectorised NumPy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from captioner.model import ShowAndTell
from captioner.text import Vocabulary

METHODS = ("beam", "greedy", "sample")


@dataclass
class Hypothesis:
    """One decoded caption: word ids (without `<start>`/`<end>`), total log-probability, score."""

    ids: list[int]
    log_prob: float
    score: float  # log_prob with length normalisation: what beams are ranked by


@dataclass
class DecodeOptions:
    method: str = "beam"
    beam_size: int = 3
    max_len: int = 30
    # alpha: rank finished beams by log_prob / n_tokens**alpha. 0.5 is best on Flickr8k dev for
    # beam 3 and 5 (docs/experiments.md); 0 favours the short, generic sentences beams drift to.
    length_penalty: float = 0.5
    temperature: float = 1.0
    seed: int | None = None
    num_results: int = 1  # how many top beams to return per image

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"decoding method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.beam_size < 1 or self.max_len < 1 or self.num_results < 1:
            raise ValueError("beam size, max length and number of results must be at least 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")


class Decoder:
    """Decoding over one `ShowAndTell` model, with its step function compiled once."""

    def __init__(self, model: ShowAndTell, vocab: Vocabulary):
        self.model, self.vocab = model, vocab
        # Never emit the tokens that are not words; <unk> is a word-shaped gap in a caption.
        banned = np.zeros(len(vocab), np.float32)
        banned[[vocab.pad_id, vocab.start_id, vocab.unk_id]] = -np.inf
        self._banned = tf.constant(banned)
        self._init = tf.function(lambda f: model.initial_state(f), reduce_retracing=True)
        self._step = tf.function(self._log_probs, reduce_retracing=True)

    def _log_probs(self, tokens, states, temperature):
        logits, states = self.model.step(tokens, states)
        return tf.nn.log_softmax(logits / temperature + self._banned), states

    def __call__(self, features: np.ndarray, options: DecodeOptions | None = None) -> list[list[Hypothesis]]:
        """Decode a batch of image features [N, D] into the best hypotheses for each image."""
        options = options or DecodeOptions()
        features = np.asarray(features, np.float32)
        if len(features) == 0:
            return []
        if options.method == "sample":
            return [[h] for h in self._sample(features, options)]
        width = 1 if options.method == "greedy" else max(options.beam_size, options.num_results)
        return self._beam_search(features, width, options)

    def _beam_search(self, features: np.ndarray, k: int, options: DecodeOptions) -> list[list[Hypothesis]]:
        n, end = len(features), self.vocab.end_id
        states = [tf.repeat(s, k, axis=0) for s in self._init(tf.constant(features))]
        tokens = np.full(n * k, self.vocab.start_id, np.int32)
        # Every beam of an image starts identical: only beam 0 may expand at the first step.
        scores = np.tile(np.r_[0.0, np.full(k - 1, -np.inf)], n)
        history = np.zeros((n * k, 0), np.int32)
        finished: list[list[Hypothesis]] = [[] for _ in range(n)]
        done = np.zeros(n, bool)
        temperature = tf.constant(1.0)
        for t in range(options.max_len + 1):
            log_probs, states = self._step(tf.constant(tokens), states, temperature)
            log_probs = np.asarray(log_probs)
            if t == options.max_len:  # out of room: the caption is cut here, at no cost
                log_probs = np.full_like(log_probs, -np.inf)
                log_probs[:, end] = 0.0
            cand = (scores[:, None] + log_probs).reshape(n, -1)  # [n, k*V]
            # The best 2k candidates, best first: enough to still fill k live beams.
            top = np.argpartition(-cand, 2 * k - 1, axis=1)[:, : 2 * k]
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(cand, top, axis=1), axis=1), axis=1)
            top_scores = np.take_along_axis(cand, top, axis=1)
            beam, word = np.divmod(top, len(self.vocab))
            is_end = word == end
            # An <end> only counts while it ranks within the image's top k candidates.
            for i, r in zip(*np.nonzero(is_end & (np.arange(2 * k) < k) & ~done[:, None])):
                if np.isfinite(top_scores[i, r]):
                    ids = history[i * k + beam[i, r]].tolist()
                    lp = float(top_scores[i, r])
                    finished[i].append(Hypothesis(ids, lp, lp / (len(ids) + 1) ** options.length_penalty))
            done |= np.array([len(f) >= k for f in finished])
            if done.all():
                break
            # Live beams: the best k candidates that are not <end>.
            rank = np.where(is_end, 2 * k, np.cumsum(~is_end, axis=1) - 1)
            pick = np.argsort(rank, axis=1, kind="stable")[:, :k]
            src = (np.arange(n)[:, None] * k + np.take_along_axis(beam, pick, axis=1)).ravel()
            tokens = np.take_along_axis(word, pick, axis=1).ravel().astype(np.int32)
            scores = np.take_along_axis(top_scores, pick, axis=1).ravel()
            scores[np.repeat(done, k)] = -np.inf  # finished images stop competing
            history = np.concatenate([history[src], tokens[:, None]], axis=1)
            states = [tf.gather(s, src) for s in states]
        return [sorted(f, key=lambda h: -h.score)[: options.num_results] for f in finished]

    def _sample(self, features: np.ndarray, options: DecodeOptions) -> list[Hypothesis]:
        rng = np.random.default_rng(options.seed)
        n = len(features)
        states = self._init(tf.constant(features))
        tokens = np.full(n, self.vocab.start_id, np.int32)
        ids = np.zeros((n, 0), np.int32)
        log_prob, alive = np.zeros(n), np.ones(n, bool)
        temperature = tf.constant(float(options.temperature))
        for _ in range(options.max_len):
            log_probs, states = self._step(tf.constant(tokens), states, temperature)
            p = np.exp(np.asarray(log_probs, np.float64))
            p /= p.sum(axis=1, keepdims=True)
            tokens = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1).astype(np.int32)
            log_prob += np.where(alive, np.log(p[np.arange(n), tokens]), 0.0)
            ids = np.concatenate([ids, np.where(alive, tokens, self.vocab.end_id)[:, None]], axis=1)
            alive &= tokens != self.vocab.end_id
            if not alive.any():
                break
        out = []
        for row, lp in zip(ids, log_prob):
            words = row.tolist()
            words = words[: words.index(self.vocab.end_id)] if self.vocab.end_id in words else words
            out.append(Hypothesis(words, float(lp), float(lp)))
        return out
