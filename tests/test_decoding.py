import numpy as np
import pytest

from captioner.decoding import DecodeOptions, OptionError, decode
from captioner.model import ShowAndTell
from captioner.quiet_tensorflow import keras
from captioner.runtime_tf import TensorFlowStep
from captioner.text import Vocabulary

VOCAB = Vocabulary(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(16)])


class Decoder:
    """Decoding through the TensorFlow runtime, keeping the model at hand for reference loops."""

    def __init__(self, model: ShowAndTell):
        self.model, self.step = model, TensorFlowStep(model)

    def __call__(self, features, options):
        return decode(self.step, features, options)


@pytest.fixture(scope="module")
def decoder():
    keras.utils.set_random_seed(3)
    return Decoder(ShowAndTell(len(VOCAB), 8, embed_dim=8, units=16, dropout=0.0))


@pytest.fixture(scope="module")
def features():
    return np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32) * 3


def reference_greedy(model, features, max_len):
    """The textbook loop: one image, one token at a time, argmax."""
    out = []
    banned = [VOCAB.pad_id, VOCAB.start_id, VOCAB.unk_id]
    for f in features:
        states, token, ids = model.initial_state(f[None]), VOCAB.start_id, []
        for _ in range(max_len):
            logits, states = model.step(np.array([token]), states)
            logits = np.array(logits)[0]
            logits[banned] = -np.inf
            token = int(logits.argmax())
            if token == VOCAB.end_id:
                break
            ids.append(token)
        out.append(ids)
    return out


def sequence_log_prob(model, feature, ids):
    tokens = [VOCAB.start_id, *ids, VOCAB.end_id]
    logits = np.asarray(model((feature[None], np.array([tokens[:-1]]))), np.float64)[0]
    logits[:, [VOCAB.pad_id, VOCAB.start_id, VOCAB.unk_id]] = -np.inf
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return float(sum(log_p[t, tok] for t, tok in enumerate(tokens[1:])))


def sequence_log_prob_prefix(model, feature, ids):
    """log p(ids) without the final <end>."""
    tokens = [VOCAB.start_id, *ids]
    logits = np.asarray(model((feature[None], np.array([tokens]))), np.float64)[0]
    logits[:, [VOCAB.pad_id, VOCAB.start_id, VOCAB.unk_id]] = -np.inf
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return float(sum(log_p[t, tok] for t, tok in enumerate(ids)))


def test_greedy_matches_the_textbook_loop(decoder, features):
    got = [h[0].ids for h in decoder(features, DecodeOptions("greedy", max_len=12))]
    assert got == reference_greedy(decoder.model, features, 12)


def test_beam_scores_are_true_log_probabilities(decoder, features):
    beams = decoder(features, DecodeOptions("beam", beam_size=4, max_len=12, num_results=3))
    for f, b in zip(features, beams):
        assert len(b) == 3
        assert [h.score for h in b] == sorted((h.score for h in b), reverse=True)
        for h in b:
            if len(h.ids) < 12:  # not cut by the length limit: score is the model's log-prob
                assert h.log_prob == pytest.approx(sequence_log_prob(decoder.model, f, h.ids), abs=1e-3)


def test_a_wide_enough_beam_is_exhaustive_search():
    """With 3 words and at most 2 of them, 40 beams never prune: the result is the most likely caption."""
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "x", "y", "z"])
    keras.utils.set_random_seed(5)
    decoder = Decoder(ShowAndTell(len(vocab), 8, embed_dim=4, units=8, dropout=0.0))
    features = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32) * 3
    found = decoder(features, DecodeOptions("beam", beam_size=40, max_len=2, length_penalty=0.0))  # rank by log-prob
    candidates = [[], *[[a] for a in (4, 5, 6)], *[[a, b] for a in (4, 5, 6) for b in (4, 5, 6)]]
    for f, hyps in zip(features, found):
        def score(ids):  # a 2-word caption is cut at the limit: its <end> costs nothing
            if len(ids) == 2:
                return sequence_log_prob_prefix(decoder.model, f, ids)
            return sequence_log_prob(decoder.model, f, ids)
        best = max(candidates, key=score)
        assert hyps[0].ids == best
        assert hyps[0].log_prob == pytest.approx(score(best), abs=1e-4)


def test_batched_beam_search_equals_one_image_at_a_time(decoder, features):
    options = DecodeOptions("beam", beam_size=3, max_len=12)
    together = [h[0].ids for h in decoder(features, options)]
    alone = [decoder(features[i : i + 1], options)[0][0].ids for i in range(len(features))]
    assert together == alone


def test_max_len_and_special_tokens(decoder, features):
    for method in ("greedy", "beam", "sample"):
        for hyps in decoder(features, DecodeOptions(method, max_len=3, seed=0)):
            assert len(hyps[0].ids) <= 3
            assert not {VOCAB.pad_id, VOCAB.start_id, VOCAB.end_id, VOCAB.unk_id} & set(hyps[0].ids)


def test_sampling_is_seeded_and_temperature_sharpens(decoder, features):
    a = decoder(features, DecodeOptions("sample", seed=7, max_len=10))
    b = decoder(features, DecodeOptions("sample", seed=7, max_len=10))
    assert [h[0].ids for h in a] == [h[0].ids for h in b]
    cold = decoder(features, DecodeOptions("sample", seed=1, temperature=1e-5, max_len=12))
    assert [h[0].ids for h in cold] == reference_greedy(decoder.model, features, 12)


@pytest.mark.parametrize("field, value", [
    ("method", "nucleus"), ("beam_size", 0), ("beam_size", 300_000), ("beam_size", 2.5), ("beam_size", True),
    ("max_len", 10**9), ("max_len", "long"), ("length_penalty", float("nan")), ("length_penalty", "0.5"),
    ("temperature", 0), ("temperature", float("inf")), ("seed", -1), ("seed", 1.5), ("num_results", 4),
])
def test_bad_options_name_their_field(field, value):
    with pytest.raises(OptionError) as info:
        DecodeOptions(**{field: value})
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")


def test_options_are_frozen_and_replaced():
    from dataclasses import FrozenInstanceError, replace

    options = DecodeOptions()
    with pytest.raises(FrozenInstanceError):
        options.beam_size = 5  # type: ignore[misc]
    assert replace(options, beam_size=5).beam_size == 5 and options.beam_size == 3
    assert DecodeOptions.from_dict(options.to_dict()) == options
    with pytest.raises(OptionError, match="run: is not a decoding option"):
        DecodeOptions.from_dict({"run": "rm -rf ~"})


def test_more_results_than_beams_or_without_beams_is_refused():
    with pytest.raises(OptionError, match="num_results"):
        DecodeOptions("greedy", num_results=2)
    with pytest.raises(OptionError, match="at most the beam size"):
        DecodeOptions("beam", beam_size=2, num_results=3)
