"""`captioner train --train-features PREFIX`: training streamed from the shards of
`captioner beam extract-features`, against training from the feature cache, on the shapes data.

The shards are written by the Beam job on the DirectRunner, as a user would write them.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from captioner import training
from captioner.cli import main

EPOCHS = 3
# Streamed and in-memory training see the same captions in another order (shards interleaved, a
# bounded shuffle buffer), so their losses differ a little. Measured gap on the shapes data (3
# epochs, loss and val_loss): at most 1.5 %; allowed: 5 %.
LOSS_RTOL = 0.05


@pytest.fixture(scope="module")
def shards(shapes_root, tmp_path_factory) -> str:
    """Every split's features, in three shards: one prefix serves train and dev."""
    prefix = tmp_path_factory.mktemp("shards") / "all"
    assert main(["beam", "extract-features", "--data", str(shapes_root), "--split", "all", "--encoder", "tiny",
                 "--output", str(prefix), "--num-shards", "3"]) == 0
    return str(prefix)


def _examples(ds) -> list[tuple]:
    """Every (feature, input words, target words) of one pass, padding dropped, in order."""
    out = []
    for (features, inputs), targets in ds.as_numpy_iterator():
        assert inputs.shape == targets.shape and len(features) == len(inputs)
        out += [(f.tobytes(), tuple(x[x != 0]), tuple(y[y != 0])) for f, x, y in zip(features, inputs, targets)]
    return out


def test_streamed_batches_hold_the_in_memory_batches(shards, shapes, tiny_encoder):
    from captioner.feature_shards import read_split
    from captioner.text import Vocabulary

    identity = tiny_encoder.describe()
    vocab = Vocabulary.build((c for i in shapes.splits["train"] for c in shapes.captions[i]), 1)
    ids, features = read_split(shards, identity, shapes, "train")
    assert ids == shapes.splits["train"] and features.shape == (len(ids), tiny_encoder.feature_dim)
    rows, seqs = training.caption_sequences(shapes, ids, vocab, 20)

    in_memory = training.teacher_forcing_dataset(features, rows, seqs, vocab, 16, shuffle=False)
    streamed = training.streamed_teacher_forcing_dataset(shards, identity, ids, rows, seqs, vocab, 16, shuffle=False)
    expected = _examples(in_memory)
    assert len(expected) == len(rows)
    once = _examples(streamed)
    assert sorted(once) == sorted(expected)  # every caption once, with its own photo's feature
    assert int(streamed.cardinality()) == int(in_memory.cardinality()) == len(list(streamed))
    assert _examples(streamed) == once  # unshuffled: the same order every pass

    shuffled = training.streamed_teacher_forcing_dataset(shards, identity, ids, rows, seqs, vocab, 16, shuffle=True,
                                                         seed=1, shuffle_buffer=50)
    first, second = _examples(shuffled), _examples(shuffled)
    assert sorted(first) == sorted(second) == sorted(expected) and first != once and first != second


def _train(shapes_root: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(shapes_root), "--preset", "tiny", "--epochs", str(EPOCHS), "--output",
                 str(out), "--cache-dir", str(out.parent / "cache"), *extra])


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_training_from_shards_matches_the_cache_and_resumes(shards, shapes_root, shapes, tiny_encoder, tmp_path,
                                                           monkeypatch):
    from captioner.bundle import load_bundle
    from captioner.captioner import Captioner

    streamed, cached, resumed = tmp_path / "streamed", tmp_path / "cached", tmp_path / "resumed"
    assert _train(shapes_root, streamed, "--train-features", shards, "--dev-features", shards) == 0  # encoder: tiny
    assert not (tmp_path / "cache").exists()  # nothing was encoded
    assert _train(shapes_root, cached, "--encoder", "tiny") == 0
    assert (streamed / "model" / "vocab.json").read_bytes() == (cached / "model" / "vocab.json").read_bytes()
    for one, two in zip(_history(streamed), _history(cached), strict=True):
        for key in ("loss", "val_loss"):
            assert float(one[key]) == pytest.approx(float(two[key]), rel=LOSS_RTOL), (key, one["epoch"])

    # Interrupted at the start of its last epoch, as a kill would, then rerun: it finishes from the backup.
    start = training.EpochTimer.on_epoch_begin

    def stop_at_last(self, epoch, logs=None):
        if epoch == EPOCHS - 1:
            raise KeyboardInterrupt
        start(self, epoch, logs)
    monkeypatch.setattr(training.EpochTimer, "on_epoch_begin", stop_at_last)
    assert _train(shapes_root, resumed, "--train-features", shards, "--dev-features", shards) == 130
    assert (resumed / "backup").exists() and len(_history(resumed)) == EPOCHS - 1
    monkeypatch.setattr(training.EpochTimer, "on_epoch_begin", start)
    assert _train(shapes_root, resumed, "--train-features", shards, "--dev-features", shards) == 0
    assert [int(r["epoch"]) for r in _history(resumed)] == list(range(EPOCHS))
    assert not (resumed / "backup").exists()
    assert float(_history(resumed)[-1]["loss"]) < 0.8 * float(_history(resumed)[0]["loss"])  # it learned

    bundle = load_bundle(resumed / "model")
    assert bundle.info["dataset"]["train_images"] == len(shapes.splits["train"])
    # Familiarity needs the training features at hand; streamed ones never are (the cached run has it).
    assert bundle.familiarity is None and load_bundle(cached / "model").familiarity is not None
    assert Captioner(bundle, tiny_encoder).caption(shapes.images[shapes.splits["test"][0]]).caption


def _copy_shards(prefix: str, to: Path, edit=None) -> str:
    """The shards of `prefix` under `to`, their manifest changed by `edit`."""
    source = Path(prefix)
    manifest = json.loads(Path(f"{prefix}-manifest.json").read_text())
    for name in manifest["shards"]:
        shutil.copy(source.parent / name, to / name)
    if edit:
        edit(manifest)
    (to / f"{source.name}-manifest.json").write_text(json.dumps(manifest))
    return str(to / source.name)


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_foreign_or_unknown_features_are_refused_with_one_line(shards, shapes_root, tiny_encoder, tmp_path, capsys):
    from captioner.feature_shards import encode_record
    from captioner.quiet_tensorflow import tf

    def other_weights(manifest):
        manifest["encoder"]["weights_id"] = "0" * 64
    foreign = _copy_shards(shards, tmp_path, other_weights)
    assert _train(shapes_root, tmp_path / "a", "--train-features", foreign) == 2
    assert _error(capsys).endswith(f"{foreign}-manifest.json: features of encoder tiny (00000000000000000000), "
                                   f"not of tiny ({tiny_encoder.describe()['weights_id'][:20]})")

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    shard = stranger / "x-features-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(str(shard)) as w:
        w.write(encode_record("not-a-photo", "k", np.zeros(tiny_encoder.feature_dim, np.float32)))
    (stranger / "x-manifest.json").write_text(json.dumps(
        {"format": "captioner-features", "version": 1, "encoder": tiny_encoder.describe(), "count": 1,
         "shards": [shard.name]}))
    assert _train(shapes_root, tmp_path / "b", "--train-features", str(stranger / "x")) == 2
    assert _error(capsys) == (f"captioner: error: {shard}: field 'id': photo 'not-a-photo' is not in the dataset "
                              "shapes (features of another dataset?)")

    def miscount(manifest):
        manifest["count"] += 1
    (tmp_path / "short").mkdir()
    short = _copy_shards(shards, tmp_path / "short", miscount)
    assert _train(shapes_root, tmp_path / "c", "--train-features", short) == 2
    assert _error(capsys) == (f"captioner: error: {short}-manifest.json: field 'count' is 301, "
                              "the shards hold 300 records")


def test_flags_that_do_not_go_with_streaming_are_refused_before_any_work(shards, shapes_root, tmp_path, capsys):
    assert _train(shapes_root, tmp_path / "a", "--dev-features", shards) == 2
    assert _error(capsys) == ("captioner: error: --dev-features: goes with --train-features (features of both "
                              "splits from shards)")
    assert _train(shapes_root, tmp_path / "b", "--scst", "--train-features", shards) == 2
    assert _error(capsys).startswith("captioner: error: --train-features: self-critical training reads the "
                                     "feature cache")
    assert _train(shapes_root, tmp_path / "c", "--model-type", "show-attend-tell", "--train-features", shards) == 2
    assert _error(capsys).startswith("captioner: error: --train-features: sharded features are pooled vectors")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
