"""Self-critical sequence training (Rennie et al. 2017): fine-tune a trained decoder on the
metric it is judged by.

Cross-entropy teaches the decoder to predict the next word of a human caption, given the human
words before it; at test time it reads its own words, and it is scored on whole captions.
Self-critical training closes that gap with REINFORCE: for each training photo the decoder
samples several captions, each is rewarded with its CIDEr-D against the photo's references,
and the log-probability of every sampled word is pushed up or down by how much its caption beat
the baseline: the mean reward of the same photo's other samples (Luo 2020's variant, which
needs no extra greedy pass and gives a lower-variance baseline than the greedy caption).

Runs as `model.fit` over a wrapper model, so it resumes, selects on dev and stops early exactly
as cross-entropy training does; the bundle it writes holds the fine-tuned decoder.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from captioner.bundle import Bundle, BundleError
from captioner.cider import CiderD
from captioner.data import CaptionDataset
from captioner.quiet_tensorflow import keras, tf
from captioner.text import Vocabulary, tokenize
from captioner.train_config import TrainConfig
from captioner.training import (EpochTimer, adam, encode_splits, feature_lookup, finish_run, run_callbacks,
                                start_run)

log = logging.getLogger(__name__)

# The `TrainConfig` fields a self-critical run uses (the decoder's shape comes from its --init bundle).
STAGE_SETTINGS = ("epochs", "batch_size", "samples", "learning_rate", "warmup_epochs", "clipnorm", "patience",
                  "monitor", "dev_images", "max_len", "seed")


class SelfCritical(keras.Model):
    """A trained decoder, wrapped so that `fit` runs self-critical steps on batches of
    (image features, image index). `reward(indices [N], token ids [N, T]) -> float32 [N]`
    scores sampled captions; `samples` captions are drawn per image (at least 2: each one's
    baseline is the mean of the others)."""

    def __init__(self, decoder, reward, samples: int, max_len: int, **kwargs):
        super().__init__(**kwargs)
        if samples < 2:
            raise ValueError(f"--samples: self-critical training needs at least 2 samples per image, got {samples}")
        self.decoder, self.reward, self.samples, self.max_len = decoder, reward, samples, max_len
        # The words decoding may never emit are never sampled either.
        # Finite: the log-probabilities of padded positions are computed too (and masked), never inf.
        self.banned = Vocabulary.banned_logits(decoder.vocab_size, -1e9)
        self.built = True  # its only weights are the decoder's, built already
        # Epoch means, as `fit` logs them (a bare value in the step's dict would log the last batch's).
        self.trackers = {name: keras.metrics.Mean(name=name) for name in ("loss", "reward", "words")}

    @property
    def metrics(self) -> list:
        return list(self.trackers.values())

    def call(self, inputs, training: bool = False):
        return self.decoder(inputs, training=training)

    def sample(self, features):
        """Captions drawn from the decoder: token ids [N, max_len], `<pad>` after `<end>`."""
        states, context = self.decoder.initial_state(features), self.decoder.image_context(features)
        n = tf.shape(features)[0]
        images = tf.range(n)  # row i reads image i (an attention decoder's regions)
        tokens = tf.fill([n], Vocabulary.start_id)
        alive = tf.ones([n], tf.bool)
        out = []
        for _ in range(self.max_len):  # unrolled: a fixed, short loop compiles into one graph
            logits, states = self.decoder.step(tokens, states, context, images)
            tokens = tf.random.categorical(logits + self.banned, 1, dtype=tf.int32)[:, 0]
            tokens = tf.where(alive, tokens, Vocabulary.pad_id)
            out.append(tokens)
            alive &= tokens != Vocabulary.end_id
        return tf.stack(out, axis=1)

    def train_step(self, data):
        features, images = data
        features = tf.repeat(features, self.samples, axis=0)
        images = tf.repeat(images, self.samples, axis=0)
        tokens = self.sample(features)
        rewards = tf.numpy_function(self.reward, [images, tokens], tf.float32, stateful=False)
        rewards = tf.reshape(rewards, [-1, self.samples])
        baseline = (tf.reduce_sum(rewards, axis=1, keepdims=True) - rewards) / (self.samples - 1)
        advantage = tf.reshape(rewards - baseline, [-1, 1])
        real = tokens != Vocabulary.pad_id  # the words and the <end>: every sampled choice
        length = tf.reduce_max(tf.reduce_sum(tf.cast(real, tf.int32), axis=1))
        tokens, real = tokens[:, :length], tf.cast(real[:, :length], tf.float32)
        inputs = tf.concat([tf.fill([tf.shape(tokens)[0], 1], Vocabulary.start_id), tokens[:, :-1]], axis=1)
        inputs = tf.where(inputs == Vocabulary.end_id, Vocabulary.pad_id, inputs)
        with tf.GradientTape() as tape:
            # Dropout off: the log-probabilities are those of the policy that sampled the words.
            logits = self.decoder((features, inputs), training=False) + self.banned
            log_probs = -tf.nn.sparse_softmax_cross_entropy_with_logits(
                tf.where(real > 0, tokens, Vocabulary.end_id), logits)
            loss = -tf.reduce_sum(advantage * log_probs * real) / tf.maximum(tf.reduce_sum(real), 1.0)
        variables = self.decoder.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        values = {"loss": loss, "reward": tf.reduce_mean(rewards), "words": tf.reduce_mean(tf.reduce_sum(real, axis=1)) - 1.0}
        for name, value in values.items():
            self.trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.trackers.items()}


def self_critical(
    dataset: CaptionDataset,
    init: Bundle,
    encoder,
    output: str | Path,
    config: TrainConfig,
    cache_dir: str | Path | None = None,
    verbose: int = 2,
) -> Bundle:
    """Fine-tune `init`'s decoder (either model type) with self-critical training on the dataset's
    train split, select on dev, and return the best bundle. The run folder is laid out and
    resumed as `captioner.training.train`'s; `config` gives the schedule (epochs, learning rate,
    batch size in captions: `batch_size // samples` images a step), the samples per image and
    the selection; the decoder's shape and vocabulary come from `init`."""
    if init.model is None:
        raise BundleError(f"{init.directory}: self-critical training needs the Keras decoder")
    if encoder.describe() != init.encoder:
        raise BundleError(f"{init.directory}: the model was trained on encoder {init.encoder['name']} "
                          f"({init.encoder['weights_id'][:20]}), not on {encoder.name} with these weights")
    if config.monitor == "loss":
        raise ValueError("--monitor: self-critical training has no dev loss; choose bleu or cider")
    output, resuming = start_run(output, config.seed)
    splits = encode_splits(dataset, encoder, init.model_type, output, cache_dir, verbose)
    train_ids, train_features = splits["train"]
    if not train_ids:
        raise ValueError(f"{dataset.root}: the dataset has no training images")
    vocab = init.vocab
    cider = CiderD([[tokenize(c) for c in dataset.captions[i]] for i in train_ids])

    def reward(images: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        return cider.scores([vocab.decode(t).split() for t in tokens], images)

    images_per_step = max(1, config.batch_size // config.samples)
    rows = np.arange(len(train_ids), dtype=np.int32)
    lookup = feature_lookup(train_features)
    train_ds = (tf.data.Dataset.from_tensor_slices(rows)
                .shuffle(len(rows), seed=config.seed, reshuffle_each_iteration=True)
                .batch(images_per_step)
                .map(lambda r: (tf.cast(lookup(r), tf.float32), r), num_parallel_calls=tf.data.AUTOTUNE)
                .prefetch(tf.data.AUTOTUNE))
    steps = int(train_ds.cardinality())
    log.info("self-critical training: %d train images, %d samples each, %d steps an epoch",
             len(train_ids), config.samples, steps)

    decoder = init.model
    model = SelfCritical(decoder, reward, config.samples, config.max_len)
    model.compile(optimizer=adam(config, steps))

    earlier = init.info.get("self_critical") or []
    # The record of every stage: the cross-entropy run's own, then one entry per self-critical run.
    first = {"cross_entropy_best": init.info.get("best")} if not earlier else {}
    stage = {name: getattr(config, name) for name in STAGE_SETTINGS}

    def make_bundle(best: dict) -> Bundle:
        info = {**init.info, **first, "self_critical": [*earlier, {"config": stage, "best": best}], "best": best,
                "train_seconds": round(init.info.get("train_seconds", 0.0) + timer.total, 1)}
        return Bundle(decoder, vocab, init.encoder, init.decoding, info)

    timer = EpochTimer(output / "history.csv")
    callbacks = run_callbacks(output, config, dataset, splits["dev"], vocab, make_bundle, timer, resuming, decoder)
    model.fit(train_ds, epochs=config.epochs, callbacks=callbacks, verbose=verbose, shuffle=False)
    if not splits["dev"][0]:
        make_bundle({"epoch": config.epochs}).save(output / "model")
    return finish_run(output, encoder, splits)
