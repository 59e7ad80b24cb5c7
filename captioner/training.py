"""Training the decoder with teacher forcing on cached image features (pooled vectors for
Show and Tell, spatial maps read from a memory-mapped file for Show, Attend and Tell), or on
pooled features streamed from the shards `captioner beam extract-features` writes.

Input `<start> w1..wn`, target `w1..wn <end>`; masked cross-entropy; Adam with gradient
clipping and a warm-up + cosine learning-rate schedule; early stopping and the best
bundle chosen on dev BLEU-4; `BackupAndRestore` so a killed run resumes where it stopped.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from captioner.bundle import Bundle, load_bundle
from captioner.cider import corpus_cider
from captioner.data import CaptionDataset
from captioner.decoding import DecodeOptions, caption_texts
from captioner.evaluation import bleu_scores
from captioner.familiarity import add_familiarity
from captioner.feature_shards import ShardError, feature_dataset, manifest_path, read_split
from captioner.features import FeatureCache, encode_photos
from captioner.fileio import atomic_save, atomic_write_text
from captioner.model import MaskedCrossEntropy, ShowAndTell, ShowAttendTell
from captioner.quiet_tensorflow import keras, tf
from captioner.runtime_tf import TensorFlowStep
from captioner.text import Vocabulary, tokenize
from captioner.train_config import TrainConfig

log = logging.getLogger(__name__)


def build_model(config: TrainConfig, vocab_size: int, feature_dim: int,
                regions: int | None = None) -> ShowAndTell | ShowAttendTell:
    """The decoder that `train` trains for this configuration (untrained); `regions`: the
    encoder's H*W, for show-attend-tell."""
    if config.model_type == "show-attend-tell":
        return ShowAttendTell(vocab_size, feature_dim, regions, config.embed_dim, config.units,
                              config.attention_dim, config.dropout, config.attention_lambda)
    return ShowAndTell(vocab_size, feature_dim, config.embed_dim, config.units, config.num_layers,
                       config.dropout, config.rnn)


def caption_sequences(dataset: CaptionDataset, ids: list[str], vocab: Vocabulary, max_len: int):
    """Every caption of `ids`: its image row and its ids `<start> w1..wn <end>`, zero-padded."""
    pairs = [(row, vocab.encode(caption, max_len)) for row, i in enumerate(ids) for caption in dataset.captions[i]]
    rows = np.asarray([row for row, _ in pairs], np.int32)
    return rows, keras.utils.pad_sequences([seq for _, seq in pairs], padding="post", dtype="int32")


def teacher_forcing_dataset(
    features: np.ndarray, rows: np.ndarray, sequences: np.ndarray, vocab: Vocabulary,
    batch_size: int, shuffle: bool, seed: int = 0,
) -> tf.data.Dataset:
    """((feature, `<start> w1..wn`), `w1..wn <end>`) batches, bucketed by length to cut padding.
    Pooled features [N, D] sit in the graph; grids [N, R, C] (a memory-mapped file for a whole
    dataset) are read a batch at a time, so they never need to fit in memory."""
    lengths = (sequences != vocab.pad_id).sum(axis=1)
    ds = tf.data.Dataset.from_tensor_slices((rows, sequences, lengths))
    if shuffle:
        ds = ds.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
    return _teacher_forcing_batches(ds.map(lambda row, seq, n: (row, seq[:n])), lengths, vocab, batch_size,
                                    feature_lookup(features))


def streamed_teacher_forcing_dataset(
    prefix: str, encoder_identity: dict, ids: list[str], rows: np.ndarray, sequences: np.ndarray,
    vocab: Vocabulary, batch_size: int, shuffle: bool, seed: int = 0, shuffle_buffer: int = 10_000,
) -> tf.data.Dataset:
    """The batches of `teacher_forcing_dataset`, with the features streamed from the shards at
    `prefix` (`captioner.feature_shards`) instead of held in memory: each record is joined to its
    photo's captions by image id (records of photos not in `ids` are skipped), and shuffling holds
    `shuffle_buffer` captions while the shards are read in a new order every epoch. `ids` must be
    the photos that have a record (`read_split`): the batch count is computed from them."""
    lengths = (sequences != vocab.pad_id).sum(axis=1)
    # caption_sequences lists each photo's captions together: photo r's are [start[r], start[r] + count[r]).
    count = np.bincount(rows, minlength=len(ids)).astype(np.int32)
    start = (np.cumsum(count) - count).astype(np.int32)
    row_of = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(ids, tf.string), tf.range(len(ids), dtype=tf.int32)),
        default_value=-1)
    sequences, lengths_t, start, count = (tf.constant(a) for a in (sequences, lengths.astype(np.int32), start, count))

    def captions(image_id, key, feature):
        row = row_of.lookup(image_id)
        span = tf.range(start[row], start[row] + count[row])
        return tf.repeat(feature[None], count[row], axis=0), tf.gather(sequences, span), tf.gather(lengths_t, span)

    ds = (feature_dataset(prefix, encoder_identity, seed if shuffle else None)
          .filter(lambda image_id, key, feature: row_of.lookup(image_id) >= 0)
          .map(captions, num_parallel_calls=tf.data.AUTOTUNE)
          .unbatch())
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    return _teacher_forcing_batches(ds.map(lambda feature, seq, n: (feature, seq[:n])), lengths, vocab,
                                    batch_size, lambda features: features)


def _teacher_forcing_batches(ds: tf.data.Dataset, lengths: np.ndarray, vocab: Vocabulary, batch_size: int,
                             lookup) -> tf.data.Dataset:
    """(x, `<start> w1..wn <end>`) pairs -> teacher-forcing batches bucketed by length, where
    `lookup` turns a batch of x into features; `lengths`: every caption's, for the batch count."""
    boundaries = [10, 13, 16, 20]
    ds = ds.bucket_by_sequence_length(
        lambda x, seq: tf.shape(seq)[0],
        bucket_boundaries=boundaries,
        bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
    )
    # Bucketing hides the batch count from Keras (a "ran out of data" warning, no epoch-1 progress
    # total), yet it is fixed: each bucket yields ceil(its captions / batch size) batches.
    per_bucket = np.bincount(np.digitize(lengths, boundaries), minlength=len(boundaries) + 1)
    ds = ds.apply(tf.data.experimental.assert_cardinality(int(np.ceil(per_bucket / batch_size).sum())))

    def split(x, seq):
        # The input drops <end> (it is never fed), so input and target masks match.
        inputs = tf.where(seq == vocab.end_id, vocab.pad_id, seq)[:, :-1]
        return (lookup(x), inputs), seq[:, 1:]

    return ds.map(split, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def feature_lookup(features: np.ndarray):
    """rows [B] -> features [B, ...] inside a tf.data pipeline. Pooled features [N, D] sit in the
    graph; grids [N, R, C] (a memory-mapped file for a whole dataset) are read a batch at a time."""
    if features.ndim == 2:
        table = tf.constant(features)
        return lambda rows: tf.gather(table, rows)

    def lookup(rows):
        grids = tf.numpy_function(lambda r: features[r], [rows], tf.as_dtype(features.dtype), stateful=False)
        grids.set_shape([None, *features.shape[1:]])
        return grids
    return lookup


class DevScores(keras.callbacks.Callback):
    """Greedy-decodes dev images after each epoch and logs `val_bleu1`, `val_bleu4` and
    `val_cider` (CIDEr-D, document frequencies from these references, as pycocoevalcap counts).
    `decoder`: the decoder to run when the model being fit wraps it (self-critical training)."""

    def __init__(self, features: np.ndarray, references: list[list[str]], vocab: Vocabulary, max_len: int,
                 decoder=None):
        super().__init__()
        self.features, self.references, self.vocab, self.decoder = features, references, vocab, decoder
        self.options = DecodeOptions("greedy", max_len=max_len)

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.step_model = TensorFlowStep(self.decoder or self.model)  # compiled once, reads the live weights

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        hyps = caption_texts(self.step_model, self.vocab, self.features, self.options)
        scores = bleu_scores(self.references, hyps)
        cider = 100.0 * corpus_cider([[tokenize(r) for r in refs] for refs in self.references],
                                     [tokenize(h) for h in hyps])
        if logs is not None:
            logs["val_bleu1"], logs["val_bleu4"], logs["val_cider"] = scores["BLEU-1"], scores["BLEU-4"], cider
        print(f" - dev BLEU-1 {scores['BLEU-1']:.1f} BLEU-4 {scores['BLEU-4']:.1f} CIDEr {cider:.1f} (greedy): "
              f"{hyps[0]!r}")


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` whose files are replaced atomically. Keras writes them in place, so a
    run killed during the save would leave a torn checkpoint that no rerun could load."""

    def _save_model(self) -> None:
        atomic_save(self._weights_path, self.model.save_weights, suffix=".weights.h5")
        atomic_write_text(self._training_metadata_path,
                          json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen}))


class EpochTimer(keras.callbacks.Callback):
    """Logs each epoch's wall time (`seconds`, dev decoding included) and the run's total, which
    survives resuming: it starts from the seconds already in `history.csv`."""

    def __init__(self, history: Path):
        super().__init__()
        self.history = history

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.total = 0.0
        if self.history.exists():
            with open(self.history, newline="") as f:
                self.total = sum(float(row.get("seconds") or 0) for row in csv.DictReader(f))

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self.start
        self.total += seconds
        if logs is not None:
            logs["seconds"] = round(seconds, 1)


class BestBundle(keras.callbacks.Callback):
    """Saves the bundle (atomically) whenever the monitored dev score improves."""

    def __init__(self, path: Path, make_bundle, monitor: str, mode: str, resuming: bool):
        super().__init__()
        self.path, self.make_bundle, self.monitor, self.mode = path, make_bundle, monitor, mode
        self.best = -math.inf if mode == "max" else math.inf
        self.resuming = resuming

    def on_train_begin(self, logs=None) -> None:
        if self.resuming and (self.path / "config.json").exists():  # keep the best so far
            best = json.loads((self.path / "config.json").read_text()).get("info", {}).get("best", {})
            self.best = best.get(self.monitor, self.best)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        if (value > self.best) if self.mode == "max" else (value < self.best):
            self.best = float(value)
            best = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items() if k != "learning_rate"}}
            self.make_bundle(best).save(self.path)


def start_run(output: str | Path, seed: int) -> tuple[Path, bool]:
    """The run folder, made if needed, and whether an interrupted run is resumed from it."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    resuming = (output / "backup").exists()
    if not resuming:
        (output / "history.csv").unlink(missing_ok=True)
    keras.utils.set_random_seed(seed)
    return output, resuming


def encode_splits(dataset: CaptionDataset, encoder, model_type: str, output: Path, cache_dir: str | Path | None,
                  verbose: int, which: tuple[str, ...] = ("train", "dev")
                  ) -> dict[str, tuple[list[str], np.ndarray | None]]:
    """(image ids, features) of the splits `which`, through the feature cache: pooled
    vectors, or for show-attend-tell the spatial maps (float16), gathered in a memory-mapped file
    in the run folder (Flickr8k's train split: 750 MB) so they never need to fit in memory."""
    attention = model_type == "show-attend-tell"
    if attention:
        from captioner.features import GridEncoder

        feature_encoder = GridEncoder(encoder)
        cache = FeatureCache(encoder.describe(), cache_dir, grid_shape=feature_encoder.grid_shape)
    else:
        feature_encoder, cache = encoder, FeatureCache(encoder.describe(), cache_dir)
    out = {}
    for what in which:
        ids = dataset.splits.get(what, [])
        if not ids:
            out[what] = ([], None)
            continue
        ids, features, failures = encode_photos(dataset.images, ids, feature_encoder, cache, progress=verbose > 0,
                                                description=f"Encoding {what} photos",
                                                out_path=output / f"grids-{what}.npy" if attention else None)
        for failure in failures:
            log.warning("skipped %s", failure)
        out[what] = (ids, features)
    return out


def shard_splits(dataset: CaptionDataset, encoder, train_shards: str, dev_shards: str | None, output: Path,
                 cache_dir: str | Path | None, verbose: int) -> dict[str, tuple[list[str], np.ndarray | None]]:
    """`encode_splits` for streamed training: the train photos that have a record in the shards at
    `train_shards` (their features stay there: None), and the dev split's ids and features, from
    the shards at `dev_shards` or else through the feature cache."""
    identity = encoder.describe()
    train_ids, _ = read_split(train_shards, identity, dataset, "train", with_features=False)
    if not train_ids:
        raise ShardError(f"{manifest_path(train_shards)}: none of the dataset's train photos has a record")
    if len(train_ids) < len(dataset.splits["train"]):
        log.warning("%d train photos have no record in %s: skipped", len(dataset.splits["train"]) - len(train_ids),
                    train_shards)
    dev = (read_split(dev_shards, identity, dataset, "dev") if dev_shards else
           encode_splits(dataset, encoder, "show-and-tell", output, cache_dir, verbose, ("dev",))["dev"])
    return {"train": (train_ids, None), "dev": dev}


def remove_grid_files(output: Path) -> None:
    """The run folder's copies of the grids (the cache keeps them)."""
    for what in ("train", "dev"):
        (output / f"grids-{what}.npy").unlink(missing_ok=True)


@keras.saving.register_keras_serializable(package="captioner")
class FusedAdam(keras.optimizers.Adam):
    """Keras's Adam, each weight updated by TensorFlow's fused kernel (`ResourceApplyAdam`: the
    same formula, one pass over the weight and its moments) instead of Keras's ten element-wise
    ops, each a pass over memory. On a 2-core CPU those passes made Adam a sixth of the default
    model's step (`bench/train_profile.py`). The updates are Keras's to float rounding. The
    TensorFlow backend only, which is the package's."""

    def update_step(self, gradient, variable, learning_rate) -> None:
        # Not fused: AMSGrad (the kernel has none) and the embedding's gradient, which comes as
        # slices: Keras squares those before summing repeated words, which the kernel would not.
        if self.amsgrad or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle, v=self._velocities[index].value.handle,
            beta1_power=beta_1**step, beta2_power=beta_2**step, lr=tf.cast(learning_rate, dtype),
            beta1=beta_1, beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
        )


def adam(config: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam (fused) with gradient clipping, a linear warm-up and a cosine decay over the run."""
    warmup = int(config.warmup_epochs * steps_per_epoch)
    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate * 0.1, decay_steps=max(1, config.epochs * steps_per_epoch - warmup), alpha=0.05,
        warmup_target=config.learning_rate, warmup_steps=warmup,
    )
    return FusedAdam(schedule, clipnorm=config.clipnorm)


def run_callbacks(output: Path, config: TrainConfig, dataset: CaptionDataset, dev: tuple[list[str], np.ndarray | None],
                  vocab: Vocabulary, make_bundle, timer: EpochTimer, resuming: bool,
                  decoder=None) -> list[keras.callbacks.Callback]:
    """Backup and restore, the dev scores, the best bundle, early stopping and the history file.
    Without dev images there is nothing to select on: the caller saves the last epoch."""
    callbacks: list[keras.callbacks.Callback] = [
        AtomicBackupAndRestore(str(output / "backup")),
        keras.callbacks.TerminateOnNaN(),
    ]
    dev_ids, dev_features = dev
    if dev_ids:
        n = min(config.dev_images, len(dev_ids))
        if config.monitor != "loss":
            callbacks.append(DevScores(dev_features[:n], [dataset.captions[i] for i in dev_ids[:n]], vocab,
                                       config.max_len, decoder))
        monitor, mode = MONITORS[config.monitor]
        callbacks += [
            timer,  # after the dev decoding it times, before the callbacks that record `seconds`
            BestBundle(output / "model", make_bundle, monitor, mode, resuming),
            keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=config.patience),
        ]
    else:
        callbacks.append(timer)
    callbacks.append(keras.callbacks.CSVLogger(str(output / "history.csv"), append=True))
    return callbacks


# --monitor -> (the logged figure, better when it is higher or lower)
MONITORS = {"bleu": ("val_bleu4", "max"), "cider": ("val_cider", "max"), "loss": ("val_loss", "min")}


def finish_run(output: Path, encoder, splits: dict) -> Bundle:
    """Give the chosen bundle its familiarity data (from `splits`, what `encode_splits` returned) and
    its LiteRT files (once: converting costs seconds), and load it."""
    (_, train_features), (dev_ids, dev_features) = splits["train"], splits["dev"]
    if not dev_ids:  # calibrated on dev photos: without them, no familiarity data
        log.info("no familiarity data: it is calibrated on dev photos and the dataset has none")
    elif train_features is None:
        log.info("no familiarity data: the training features were streamed from shards, never held; "
                 "`captioner export --familiarity DATA` adds it from the feature cache")
    else:
        add_familiarity(output / "model", train_features, dev_features)
    remove_grid_files(output)
    from captioner.export_litert import add_litert_files

    add_litert_files(output / "model", encoder)
    return load_bundle(output / "model")


def train(
    dataset: CaptionDataset,
    encoder,
    output: str | Path,
    config: TrainConfig | None = None,
    cache_dir: str | Path | None = None,
    verbose: int = 2,
    strategy: tf.distribute.Strategy | None = None,
    train_shards: str | None = None,
    dev_shards: str | None = None,
) -> Bundle:
    """Train on the dataset's train split, select on dev, and return the best bundle.

    Writes `<output>/model` (the bundle), `<output>/history.csv` and `<output>/backup`
    (deleted when training completes). Rerunning an interrupted call resumes it.
    `strategy` (e.g. `tf.distribute.MirroredStrategy()`) spreads each batch of
    `config.batch_size` captions over its devices; default: the one default device.

    Features come from the feature cache (encoding what it lacks) and are held in memory, or
    with `train_shards` (a `captioner beam extract-features` prefix) are streamed from its
    shards, never all in memory; the dev split then comes from `dev_shards` (read into memory:
    it is decoded every epoch) or from the cache.
    """
    config = config or TrainConfig()
    if dev_shards and not train_shards:
        raise ValueError("dev_shards: goes with train_shards (features of both splits from shards)")
    if train_shards and config.model_type == "show-attend-tell":
        raise ValueError("--train-features: sharded features are pooled vectors; show-attend-tell trains on the "
                         "spatial maps of the feature cache (captioner extract-features --grid)")
    output, resuming = start_run(output, config.seed)
    train_ids = dataset.splits.get("train", [])
    if not train_ids:
        raise ValueError(f"{dataset.root}: the dataset has no training images")
    vocab = Vocabulary.build((c for i in train_ids for c in dataset.captions[i]), config.min_count)
    if train_shards:
        splits = shard_splits(dataset, encoder, train_shards, dev_shards, output, cache_dir, verbose)
    else:
        splits = encode_splits(dataset, encoder, config.model_type, output, cache_dir, verbose)
    (train_ids, train_features), (dev_ids, dev_features) = splits["train"], splits["dev"]
    rows, seqs = caption_sequences(dataset, train_ids, vocab, config.max_len)
    if train_shards:
        train_ds = streamed_teacher_forcing_dataset(train_shards, encoder.describe(), train_ids, rows, seqs, vocab,
                                                    config.batch_size, True, config.seed, config.shuffle_buffer)
        feature_shape = (encoder.feature_dim,)
    else:
        train_ds = teacher_forcing_dataset(train_features, rows, seqs, vocab, config.batch_size, True, config.seed)
        feature_shape = train_features.shape[1:]
    steps = int(train_ds.cardinality())
    log.info("vocabulary %d words; %d train captions of %d images; %d dev images",
             len(vocab), len(rows), len(train_ids), len(dev_ids))

    # Variables made in the strategy's scope are mirrored on its devices; `fit` then splits
    # every batch among them and sums the gradients.
    with (strategy or tf.distribute.get_strategy()).scope():
        model = build_model(config, len(vocab), encoder.feature_dim,
                            feature_shape[0] if config.model_type == "show-attend-tell" else None)
        fitted = sampled_trainer(config, model) if config.sampled_softmax else model
        fitted.compile(optimizer=adam(config, steps), loss=MaskedCrossEntropy(config.label_smoothing))
        if strategy is not None:
            # Keras 3 builds a distributed model on the MEAN of the first batch's replicas, which
            # turns the word ids into floats that the embedding refuses; build it on a real-typed
            # batch first (an evaluation step: the weights do not change).
            words = np.zeros((1, 2), np.int32)
            fitted.test_on_batch((np.zeros((1, *feature_shape), np.float32), words), words)

    def make_bundle(best: dict) -> Bundle:
        # The dataset as described, not where it lay on the trainer's machine.
        info = {"train_config": asdict(config), "dataset": {**dataset.describe(), "train_images": len(train_ids),
                "dev_images": len(dev_ids)}, "best": best, "train_seconds": round(timer.total, 1)}
        return Bundle(model, vocab, encoder.describe(), DecodeOptions(max_len=config.max_len), info)

    timer = EpochTimer(output / "history.csv")
    validation = None
    if dev_ids:
        dev_rows, dev_seqs = caption_sequences(dataset, dev_ids, vocab, config.max_len)
        validation = teacher_forcing_dataset(dev_features, dev_rows, dev_seqs, vocab, 256, False)
    callbacks = run_callbacks(output, config, dataset, splits["dev"], vocab, make_bundle, timer, resuming,
                              decoder=model)
    # The dataset shuffles itself (seeded); Keras's own shuffle does not apply to tf.data.
    fitted.fit(train_ds, validation_data=validation, epochs=config.epochs, callbacks=callbacks, verbose=verbose,
              shuffle=False)
    if not dev_ids:  # nothing to select on: the last epoch is the model
        make_bundle({"epoch": config.epochs}).save(output / "model")
    return finish_run(output, encoder, splits)


def sampled_trainer(config: TrainConfig, model: ShowAndTell):
    """What `fit` trains when `config.sampled_softmax` is set: `model` under a sampled softmax."""
    from captioner.sampled_softmax import SampledSoftmaxTrainer

    if config.model_type != "show-and-tell":
        raise ValueError("--sampled-softmax: Show and Tell only")
    if config.label_smoothing:
        raise ValueError("--sampled-softmax has no label smoothing: pass --label-smoothing 0")
    return SampledSoftmaxTrainer(model, config.sampled_softmax)


def make_strategy(name: str) -> tf.distribute.Strategy | None:
    """The `tf.distribute` strategy `captioner train --distribute NAME` asks for: "none" (the
    default device: a GPU if TensorFlow sees one, else the CPU) or "mirrored" (every GPU of this
    machine, or the logical CPU devices configured before TensorFlow started)."""
    if name == "none":
        return None
    if name == "mirrored":
        # MirroredStrategy() alone takes every GPU, but only the first CPU device.
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.MirroredStrategy(None if gpus else [d.name for d in tf.config.list_logical_devices("CPU")])
    raise ValueError(f"--distribute: unknown strategy {name!r}; choose none or mirrored")
