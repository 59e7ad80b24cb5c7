"""The teacher-forcing input pipeline: shifted pairs, every caption once per epoch, a known length;
the fused Adam: the same updates as Keras's."""
from __future__ import annotations

import numpy as np

from captioner.text import Vocabulary
from captioner.training import teacher_forcing_dataset


def test_batches_are_shifted_pairs_covering_every_caption_once():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    captions = [" ".join(rng.choice(words, size=rng.integers(1, 25))) for _ in range(150)]
    vocab = Vocabulary.build(captions, min_count=1)
    encoded = [vocab.encode(c) for c in captions]
    sequences = np.zeros((len(encoded), max(map(len, encoded))), np.int32)
    for i, ids in enumerate(encoded):
        sequences[i, : len(ids)] = ids
    rows = np.arange(len(captions), dtype=np.int32)
    features = rng.normal(size=(len(captions), 4)).astype(np.float32)

    ds = teacher_forcing_dataset(features, rows, sequences, vocab, batch_size=16, shuffle=True)
    batches = list(ds.as_numpy_iterator())
    # Keras gets the true batch count up front (bucketing would otherwise hide it).
    assert int(ds.cardinality()) == len(batches)

    seen = []
    for (feature, inputs), targets in batches:
        assert inputs.shape == targets.shape and len(feature) == len(inputs) <= 16
        for f, x, y in zip(feature, inputs, targets):
            row = int(np.flatnonzero((features == f).all(axis=1))[0])
            n = len(encoded[row])
            np.testing.assert_array_equal(x[: n - 1], encoded[row][:-1])  # <start> w1..wn
            np.testing.assert_array_equal(y[: n - 1], encoded[row][1:])  # w1..wn <end>
            assert not x[n - 1 :].any() and not y[n - 1 :].any()  # padding, masked out
            seen.append(row)
    assert sorted(seen) == list(range(len(captions)))


def test_fused_adam_updates_the_weights_as_keras_adam_does():
    import keras

    from captioner.model import MaskedCrossEntropy, ShowAndTell
    from captioner.training import FusedAdam

    rng = np.random.default_rng(0)
    features = rng.normal(size=(4, 8)).astype(np.float32)
    tokens = rng.integers(1, 20, (4, 6)).astype(np.int32)
    trained = []
    for optimizer in (keras.optimizers.Adam, FusedAdam):
        keras.utils.set_random_seed(0)
        model = ShowAndTell(20, 8, embed_dim=6, units=10, dropout=0.0)
        schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=5, warmup_target=1e-2, warmup_steps=2)
        model.compile(optimizer=optimizer(schedule, clipnorm=0.5), loss=MaskedCrossEntropy(0.1))
        for _ in range(5):
            model.train_on_batch((features, tokens[:, :-1]), tokens[:, 1:])
        trained.append(model.get_weights())
    assert not np.allclose(trained[0][0], ShowAndTell(20, 8, embed_dim=6, units=10).get_weights()[0])
    for keras_weight, fused_weight in zip(*trained):
        np.testing.assert_allclose(fused_weight, keras_weight, rtol=1e-5, atol=1e-6)
