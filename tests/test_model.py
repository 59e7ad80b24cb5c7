import keras
import numpy as np
import pytest

from captioner.model import MaskedCrossEntropy, ShowAndTell

TOKENS = np.array([[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0], [1, 4, 4, 4, 4, 2]])


def teacher_forcing(tokens):
    return np.where(tokens == 2, 0, tokens)[:, :-1], tokens[:, 1:]


@pytest.mark.parametrize("rnn,layers", [("lstm", 1), ("lstm", 2), ("gru", 1)])
def test_step_by_step_equals_teacher_forced_call(rnn, layers):
    model = ShowAndTell(20, 8, embed_dim=6, units=10, num_layers=layers, dropout=0.3, rnn=rnn)
    features = np.random.default_rng(0).random((3, 8), dtype=np.float32)
    full = np.asarray(model((features, TOKENS[:, :5])))
    states = model.initial_state(features)
    assert len(states) == layers * (2 if rnn == "lstm" else 1)
    for t in range(5):
        logits, states = model.step(TOKENS[:, t], states)
        np.testing.assert_allclose(np.asarray(logits)[2], full[2, t], atol=1e-5)  # row 2 has no padding


def test_image_feature_sets_the_initial_state():
    model = ShowAndTell(20, 8, embed_dim=6, units=10, dropout=0.0)
    a, b = np.zeros((1, 8), np.float32), np.ones((1, 8), np.float32)
    tokens = TOKENS[:1, :3]
    assert not np.allclose(model((a, tokens)), model((b, tokens)))


def test_loss_is_the_mean_over_real_tokens_only():
    model = ShowAndTell(20, 8, embed_dim=6, units=10)
    features = np.random.default_rng(1).random((3, 8), dtype=np.float32)
    x, y = teacher_forcing(TOKENS)
    logits = model((features, x))
    z = np.asarray(logits, np.float64)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, y[..., None], -1)[..., 0]
    expected = nll[y != 0].mean()
    assert float(MaskedCrossEntropy()(y, logits)) == pytest.approx(expected, rel=1e-5)


def test_saved_and_loaded_model_is_identical(tmp_path):
    model = ShowAndTell(20, 8, embed_dim=6, units=10, num_layers=2)
    model.save(tmp_path / "m.keras")
    restored = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True, compile=False)
    features = np.ones((2, 8), np.float32)
    np.testing.assert_array_equal(model((features, TOKENS[:2])), restored((features, TOKENS[:2])))
    assert restored.get_config()["num_layers"] == 2


def test_unknown_rnn_type():
    with pytest.raises(ValueError, match="rnn"):
        ShowAndTell(20, 8, rnn="transformer")
