"""The teacher-forcing input pipeline: shifted pairs, every caption once per epoch, a known length."""
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
