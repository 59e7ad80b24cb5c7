"""Self-critical training: the policy gradient moves the decoder towards rewarded captions, and
`captioner train --scst` fine-tunes a bundle, selects on dev and resumes like cross-entropy training."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from captioner.cli import main


def tiny_decoder(model_type: str, vocab_size: int = 20):
    """A random-weight decoder of either type over 8-d features (attention: 4 regions of them)."""
    from captioner.model import ShowAndTell, ShowAttendTell

    if model_type == "show-attend-tell":
        return ShowAttendTell(vocab_size, feature_dim=8, regions=4, embed_dim=16, units=32, attention_dim=16,
                              dropout=0.0)
    return ShowAndTell(vocab_size, feature_dim=8, embed_dim=16, units=32, dropout=0.0)


@pytest.mark.parametrize("model_type", ["show-and-tell", "show-attend-tell"])
def test_policy_gradient_raises_the_reward(model_type):
    """A reward for saying one word: after a few dozen steps the decoder says it far more often."""
    from captioner.quiet_tensorflow import keras, tf
    from captioner.self_critical import SelfCritical

    keras.utils.set_random_seed(0)
    target = 7

    def reward(images, tokens):
        return (tokens == target).mean(axis=1).astype(np.float32) * 10

    decoder = tiny_decoder(model_type)
    model = SelfCritical(decoder, reward, samples=4, max_len=6)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    shape = (16, 4, 8) if model_type == "show-attend-tell" else (16, 8)
    features = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((features, np.arange(16, dtype=np.int32))).batch(8)

    def mean_reward():
        return float(np.mean([reward(None, model.sample(tf.constant(features)).numpy()) for _ in range(5)]))

    before = mean_reward()
    history = model.fit(data.repeat(), steps_per_epoch=60, epochs=1, verbose=0, shuffle=False)
    after = mean_reward()
    assert {"loss", "reward", "words"} <= set(history.history)
    assert after > before + 2.0, (before, after)


def test_samples_are_never_special_tokens_and_stop_at_end():
    from captioner.quiet_tensorflow import tf
    from captioner.self_critical import SelfCritical
    from captioner.text import Vocabulary

    model = SelfCritical(tiny_decoder("show-and-tell", 12), lambda i, t: np.zeros(len(t), np.float32), samples=2,
                         max_len=30)
    tokens = model.sample(tf.random.normal((64, 8))).numpy()
    assert tokens.shape == (64, 30)
    assert not np.isin(tokens, [Vocabulary.start_id, Vocabulary.unk_id]).any()
    for row in tokens:
        ends = np.flatnonzero(row == Vocabulary.end_id)
        after = row[ends[0] + 1:] if len(ends) else row[:0]
        assert (after == Vocabulary.pad_id).all()  # nothing is sampled after <end>
        assert (row[: ends[0] if len(ends) else len(row)] != Vocabulary.pad_id).all()


def test_one_sample_per_image_is_refused():
    from captioner.model import ShowAndTell
    from captioner.self_critical import SelfCritical

    with pytest.raises(ValueError, match="--samples"):
        SelfCritical(ShowAndTell(10, 4, 8, 8), lambda i, t: None, samples=1, max_len=5)


def test_scst_command_fine_tunes_a_bundle_and_resumes(trained_run, shapes_root, tmp_path):
    from captioner.bundle import load_bundle

    run, init = trained_run
    out = tmp_path / "scst"
    args = ["train", "--scst", "--init", str(run / "model"), "--data", str(shapes_root), "--output", str(out),
            "--encoder-weights", "none", "--cache-dir", str(run / "cache"), "--epochs", "2", "--batch-size", "40",
            "--learning-rate", "1e-3", "--dev-images", "50"]
    assert main(args) == 0
    bundle = load_bundle(out / "model")
    assert bundle.vocab == init.vocab and bundle.model_type == init.model_type
    [stage] = bundle.info["self_critical"]
    assert stage["config"]["samples"] == 5 and stage["config"]["learning_rate"] == 1e-3
    assert bundle.info["cross_entropy_best"] == init.info["best"]
    assert bundle.info["train_config"] == init.info["train_config"]  # the decoder's recipe, kept
    assert bundle.litert  # runs on LiteRT like any Show and Tell bundle
    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(float(r["reward"]) > 0 and float(r["val_cider"]) > 0 for r in rows)
    # The weights moved, and the chosen epoch is the one with the best dev CIDEr-D.
    assert any(not np.array_equal(a, b) for a, b in zip(bundle.model.get_weights(), init.model.get_weights()))
    assert bundle.info["best"]["val_cider"] == max(float(r["val_cider"]) for r in rows)
    # A finished run, rerun, has nothing left to do and keeps its model.
    assert main(args) == 0
    with open(out / "history.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2


@pytest.mark.parametrize("extra, message", [
    (["--init", "somewhere"], "--init: starts self-critical training"),
    (["--scst", "--init", "/nonexistent"], "--init: /nonexistent: no such model bundle folder"),
    (["--scst", "--distribute", "mirrored"], "--distribute: self-critical training runs on one device"),
])
def test_scst_usage_errors(shapes_root, tmp_path, capsys, extra, message):
    assert main(["train", "--data", str(shapes_root), "--output", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_logged_figures_are_epoch_means():
    """`fit` logs the mean reward of the epoch's batches, not the last batch's."""
    from captioner.quiet_tensorflow import keras, tf
    from captioner.self_critical import SelfCritical

    keras.utils.set_random_seed(0)
    per_image = np.array([0.0, 4.0, 8.0, 12.0], np.float32)  # a reward that depends on the image only

    def reward(images, tokens):
        return per_image[images]

    model = SelfCritical(tiny_decoder("show-and-tell"), reward, samples=2, max_len=4)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    features = np.zeros((4, 8), np.float32)
    data = tf.data.Dataset.from_tensor_slices((features, np.arange(4, dtype=np.int32))).batch(1)
    history = model.fit(data, epochs=1, verbose=0, shuffle=False)
    assert history.history["reward"][0] == pytest.approx(per_image.mean())
