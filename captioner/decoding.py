"""Turn image features into word ids: greedy, beam search and sampling, batched over images.

Decoding talks to a `StepModel` (initial state from features; one step: tokens + states ->
next-word log-probabilities + states) and is plain NumPy around it, so every runtime that can
run those two functions decodes the same way. Each step is one call for all images and all
beams at once. `DecodeOptions` is the one source of decoding defaults.

What a decoder reads of each image at every word (an attention decoder's regions and their
keys) is its image context: computed once, kept by the runtime, and read by image index, so
beam search reorders only the small per-beam states. An attention decoder also keeps its last
attention weights among its states (`attention_state` names which); the search carries them
with their beams and gives each hypothesis the weights behind each of its words.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np

from captioner.text import Vocabulary

METHODS = ("beam", "greedy", "sample")
# Bounds a stranger's bundle or a web request cannot exceed: beyond them decoding would only
# burn memory (beams x images x vocabulary floats per step) for no better caption.
MAX_BEAM_SIZE = 64
MAX_CAPTION_WORDS = 100


class OptionError(ValueError):
    """An invalid decoding option; `field` names it (the CLI turns it into the flag's name)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass(frozen=True)
class DecodeOptions:
    """How captions are decoded. Change one with `dataclasses.replace(options, beam_size=5)`."""

    method: str = "beam"  # "beam", "greedy" or "sample"
    beam_size: int = 3
    max_len: int = 30  # longest caption in words
    # Beams are ranked by log_prob / n_tokens**length_penalty. 0.5 is best on Flickr8k dev for
    # beam 3 and 5 (docs/experiments.md); 0 favours the short, generic sentences beams drift to.
    length_penalty: float = 0.5
    temperature: float = 1.0  # sampling only: below 1 safer words, above 1 wilder ones
    seed: int | None = None  # sampling only
    num_results: int = 1  # how many of the best beams to return per image

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OptionError("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name, low, high in (("beam_size", 1, MAX_BEAM_SIZE), ("max_len", 1, MAX_CAPTION_WORDS),
                                ("num_results", 1, MAX_BEAM_SIZE)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
                raise OptionError(name, f"must be a whole number from {low} to {high}, got {value!r}")
        for name, low, high in (("length_penalty", 0.0, 5.0), ("temperature", 1e-6, 100.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise OptionError(name, f"must be a number from {low:g} to {high:g}, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise OptionError("seed", f"must be a non-negative whole number, got {self.seed!r}")
        if self.num_results > 1 and self.method != "beam":
            raise OptionError("num_results", f"more than one result needs beam search, not {self.method}")
        if self.num_results > self.beam_size and self.method == "beam":
            raise OptionError("num_results", f"at most the beam size ({self.beam_size}), got {self.num_results}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> DecodeOptions:
        """Options from a JSON object (a bundle's config); unknown keys are refused by name."""
        if not isinstance(values, dict):
            raise OptionError("decoding", f"must be an object, got {type(values).__name__}")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise OptionError(unknown[0], "is not a decoding option")
        return cls(**values)


@dataclass
class Hypothesis:
    """One decoded caption: word ids (without `<start>`/`<end>`), total log-probability, score."""

    ids: list[int]
    log_prob: float
    score: float  # what beams are ranked by: log_prob / n_tokens**length_penalty
    attention: np.ndarray | None = None  # attention decoders: weights over the regions per word [len(ids), R]


class StepModel(Protocol):
    """What decoding needs of a trained decoder, in NumPy, whatever runs it. An attention decoder
    also has `attention_state`: the index of the state holding the weights [B, R] that `step`
    used for the log-probabilities it returns (absent or None: no attention)."""

    def initial_state(self, features: np.ndarray) -> tuple[list[np.ndarray], Any]:
        """Decoder states [N, ...] for image features [N, D] (or grids [N, R, C] for attention
        decoders), and the images' context: opaque to decoding, handed back to every `step`."""

    def step(self, tokens: np.ndarray, states: list[np.ndarray], context: Any,
             images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Next-word log-probabilities [B, V] (never `<pad>`, `<start>`, `<unk>`) and the new states.
        Rows come in runs of equal length, one per entry of `images` [M] (B = M * k): rows
        i*k .. i*k+k-1 read image `images[i]` of the context."""


def decode(model: StepModel, features: np.ndarray, options: DecodeOptions = DecodeOptions(),
           batch_size: int = 256) -> list[list[Hypothesis]]:
    """The best hypotheses for each row of `features` [N, ...], best first, decoded `batch_size` at a time."""
    out: list[list[Hypothesis]] = []
    for start in range(0, len(features), batch_size):
        # Converted a chunk at a time: a dataset's grids may be a memory-mapped float16 file.
        chunk = np.asarray(features[start : start + batch_size], np.float32)
        if options.method == "sample":
            out += [[h] for h in _sample(model, chunk, options)]
        else:
            width = 1 if options.method == "greedy" else options.beam_size
            out += _beam_search(model, chunk, width, options)
    return out


def caption_texts(model: StepModel, vocab: Vocabulary, features: np.ndarray, options: DecodeOptions) -> list[str]:
    """The best caption of each image, as text: what evaluation and the dev score read."""
    return [vocab.decode(hyps[0].ids) for hyps in decode(model, features, options)]


def runtime_name(model: StepModel) -> str:
    """What runs `model`: its `runtime` ("tf", "litert") or, for a step model of your own, its class name."""
    return getattr(model, "runtime", type(model).__name__)


def attends(model: StepModel) -> bool:
    """Whether `model` attends: one of its states holds the weights behind each step's words."""
    return getattr(model, "attention_state", None) is not None


def _attention(model: StepModel, states: list[np.ndarray]) -> np.ndarray | None:
    """The weights behind the last step's log-probabilities [B, R], if the model attends."""
    return states[model.attention_state] if attends(model) else None


def _beam_search(model: StepModel, features: np.ndarray, k: int, options: DecodeOptions) -> list[list[Hypothesis]]:
    n, end = len(features), Vocabulary.end_id
    states, context = model.initial_state(features)
    states = [np.repeat(s, k, axis=0) for s in states]
    attending = attends(model)
    # Per beam, the weights behind each word so far [n*k, t, R], reordered with the beams.
    seen = np.zeros((n * k, 0, states[model.attention_state].shape[1] if attending else 0), np.float32)
    tokens = np.full(n * k, Vocabulary.start_id, np.int32)
    # Every beam of an image starts identical: only beam 0 may expand at the first step.
    scores = np.tile(np.r_[0.0, np.full(k - 1, -np.inf)], n)
    history = np.zeros((n * k, 0), np.int32)
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]
    # Images still searching; row b of the arrays is beam b % k of image alive[b // k]. An image
    # whose search is over leaves the arrays, so it costs no further steps.
    alive = np.arange(n)
    for t in range(options.max_len + 1):
        log_probs, states = model.step(tokens, states, context, alive)
        vocab_size = log_probs.shape[1]
        if t == options.max_len:  # out of room: the caption is cut here, at no cost
            log_probs = np.full_like(log_probs, -np.inf)
            log_probs[:, end] = 0.0
        m = len(alive)
        cand = (scores[:, None] + log_probs).reshape(m, -1)  # [m, k*V]
        # The best 2k candidates, best first: enough to still fill k live beams.
        top = np.argpartition(-cand, 2 * k - 1, axis=1)[:, : 2 * k]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(cand, top, axis=1), axis=1), axis=1)
        top_scores = np.take_along_axis(cand, top, axis=1)
        beam, word = np.divmod(top, vocab_size)
        is_end = word == end
        # An <end> only counts while it ranks within the image's top k candidates.
        for i, r in zip(*np.nonzero(is_end & (np.arange(2 * k) < k))):
            if np.isfinite(top_scores[i, r]):
                ids = history[i * k + beam[i, r]].tolist()
                lp = float(top_scores[i, r])
                finished[alive[i]].append(Hypothesis(ids, lp, lp / (len(ids) + 1) ** options.length_penalty,
                                                     seen[i * k + beam[i, r]] if attending else None))
        done = np.array([len(finished[a]) >= k for a in alive])
        if done.all():
            break
        # Live beams: the best k candidates that are not <end>.
        rank = np.where(is_end, 2 * k, np.cumsum(~is_end, axis=1) - 1)
        pick = np.argsort(rank, axis=1, kind="stable")[:, :k]
        src = (np.arange(m)[:, None] * k + np.take_along_axis(beam, pick, axis=1)).ravel()
        tokens = np.take_along_axis(word, pick, axis=1).ravel().astype(np.int32)
        scores = np.take_along_axis(top_scores, pick, axis=1).ravel()
        history = np.concatenate([history[src], tokens[:, None]], axis=1)
        states = [s[src] for s in states]
        if attending:  # the new word's weights: those its source beam's step just used
            seen = np.concatenate([seen[src], _attention(model, states)[:, None]], axis=1)
        if done.any():  # finished images leave the search
            rows = np.repeat(~done, k)
            tokens, scores, history, states = tokens[rows], scores[rows], history[rows], [s[rows] for s in states]
            seen, alive = seen[rows], alive[~done]
    return [sorted(f, key=lambda h: -h.score)[: options.num_results] for f in finished]


def _sample(model: StepModel, features: np.ndarray, options: DecodeOptions) -> list[Hypothesis]:
    rng = np.random.default_rng(options.seed)
    n, end = len(features), Vocabulary.end_id
    states, context = model.initial_state(features)
    attending = attends(model)
    weights = []  # the attention behind each step's word [n, R]
    tokens = np.full(n, Vocabulary.start_id, np.int32)
    ids = np.zeros((n, 0), np.int32)
    log_prob, alive = np.zeros(n), np.ones(n, bool)
    images = np.arange(n)  # every image keeps its row, finished or not
    for _ in range(options.max_len):
        log_probs, states = model.step(tokens, states, context, images)
        if attending:
            weights.append(_attention(model, states))
        # softmax(log_softmax(z) / T) == softmax(z / T): temperature needs no second model call
        z = np.asarray(log_probs, np.float64) / options.temperature
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        tokens = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1).astype(np.int32)
        log_prob += np.where(alive, np.log(p[np.arange(n), tokens]), 0.0)
        ids = np.concatenate([ids, np.where(alive, tokens, end)[:, None]], axis=1)
        alive &= tokens != end
        if not alive.any():
            break
    seen = np.stack(weights, axis=1) if attending else None  # [n, steps, R]
    out = []
    for i, (row, lp) in enumerate(zip(ids, log_prob)):
        words = row.tolist()
        words = words[: words.index(end)] if end in words else words
        out.append(Hypothesis(words, float(lp), float(lp), seen[i, : len(words)] if attending else None))
    return out
