"""Training Show and Tell with a sampled softmax: it learns, and evaluation keeps the full softmax."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from captioner.model import MaskedCrossEntropy, ShowAndTell
from captioner.sampled_softmax import SampledSoftmaxTrainer
from captioner.train_config import TrainConfig
from captioner.training import sampled_trainer


def test_sampled_training_lowers_the_full_softmax_loss():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(16, 8)).astype(np.float32)
    tokens = rng.integers(4, 60, (16, 7)).astype(np.int32)
    tokens[:, 0], tokens[::2, -2:] = 1, 0  # <start>, and padding at the end of every other caption
    inputs, targets = (features, tokens[:, :-1]), tokens[:, 1:]
    decoder = ShowAndTell(60, 8, embed_dim=16, units=32, dropout=0.0)
    trainer = SampledSoftmaxTrainer(decoder, num_sampled=10)
    loss = MaskedCrossEntropy()
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
    before = trainer.evaluate(inputs, targets, verbose=0)
    assert before == pytest.approx(float(loss(targets, decoder(inputs))), rel=1e-5)  # the full softmax
    trainer.fit(inputs, targets, epochs=30, batch_size=16, verbose=0)
    assert trainer.evaluate(inputs, targets, verbose=0) < 0.6 * before


def test_sampled_softmax_settings_are_checked():
    decoder = ShowAndTell(60, 8, embed_dim=16, units=32)
    with pytest.raises(ValueError, match="label smoothing"):
        sampled_trainer(TrainConfig(sampled_softmax=10, label_smoothing=0.1), decoder)
    with pytest.raises(ValueError, match="Show and Tell"):
        sampled_trainer(TrainConfig(sampled_softmax=10, model_type="show-attend-tell"), decoder)
    with pytest.raises(ValueError, match=r"--sampled-softmax: must be from 1 to 59 \(the vocabulary has 60 words\)"):
        SampledSoftmaxTrainer(decoder, 60)
    assert sampled_trainer(TrainConfig(sampled_softmax=10), decoder).num_sampled == 10
