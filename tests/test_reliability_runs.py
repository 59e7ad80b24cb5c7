"""Nothing lost (issue 7, item 2): interrupted runs resume, files are replaced whole, a damaged
feature cache entry is recomputed.

The kill tests SIGKILL real `captioner` processes; everything else simulates a crash by making
the writer raise half-way and checks that the previous file is intact and no temporary is left.
"""
from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import IDENTITY, CountingEncoder
from PIL import Image

from captioner.bundle import Bundle, load_bundle
from captioner.decoding import DecodeOptions
from captioner.features import FeatureCache, content_key, iter_features
from captioner.fileio import (
    atomic_path,
    atomic_save,
    atomic_write_bytes,
    atomic_write_text,
)
from captioner.model import ShowAndTell
from captioner.output import FIELDS as OUTPUT_FIELDS
from captioner.synthetic import make_shapes_dataset, random_scene, render_scene
from captioner.text import Vocabulary
from captioner.training import AtomicBackupAndRestore

ROOT = Path(__file__).resolve().parents[1]


class Crash(OSError):
    """What a full disk or a dying process does to a writer half-way through."""


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ---------------------------------------------------------------------------------------------
# Atomic replacement
# ---------------------------------------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_when_the_writer_dies(tmp_path):
    target = tmp_path / "vocab.json"
    atomic_write_text(target, "old and complete")
    with pytest.raises(Crash), atomic_path(target) as tmp:
        tmp.write_text("new but only ha")
        raise Crash("disk full")
    assert target.read_text() == "old and complete"
    assert leftovers(tmp_path, {"vocab.json"}) == []
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and leftovers(tmp_path, {"vocab.json"}) == []


def test_atomic_save_with_a_writer_that_needs_a_suffix(tmp_path):
    target = tmp_path / "f.npy"

    def half_then_crash(path: Path):
        assert path.name.endswith(".npy")  # np.save appends .npy to names without it
        path.write_bytes(b"\x93NUMPY half")
        raise Crash("killed")

    atomic_save(target, lambda p: np.save(p, np.arange(3)), suffix=".npy")
    with pytest.raises(Crash):
        atomic_save(target, half_then_crash, suffix=".npy")
    np.testing.assert_array_equal(np.load(target, allow_pickle=False), np.arange(3))
    assert leftovers(tmp_path, {"f.npy"}) == []


def test_atomic_directory_replacement(tmp_path):
    target = tmp_path / "bundle"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    with pytest.raises(Crash), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("2 but torn")
        raise Crash("killed")
    assert (target / "a").read_text() == "1" and leftovers(tmp_path, {"bundle"}) == []
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and leftovers(tmp_path, {"bundle"}) == []


VOCAB = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "red", "circle"])
ENCODER = {"name": "tiny", "weights_id": "random:seed=0", "image_size": 64, "feature_dim": 8}


def test_bundle_save_crashing_mid_write_keeps_the_old_bundle(tmp_path, monkeypatch):
    old = ShowAndTell(len(VOCAB), 8, embed_dim=4, units=6)
    path = Bundle(old, VOCAB, ENCODER, DecodeOptions(max_len=12)).save(tmp_path / "model")
    features, tokens = np.ones((1, 8), np.float32), np.array([[1, 4, 5]])
    expected = old((features, tokens))

    def torn_save(self, filepath, **kwargs):
        Path(filepath).write_bytes(b"PK\x03\x04 half a model")
        raise Crash("killed while writing the decoder")

    monkeypatch.setattr(ShowAndTell, "save", torn_save)
    new = ShowAndTell(len(VOCAB), 8, embed_dim=4, units=6)
    with pytest.raises(Crash):
        Bundle(new, Vocabulary([*VOCAB.words, "blue"]), ENCODER, DecodeOptions(max_len=20)).save(path)
    loaded = load_bundle(path)
    assert loaded.decoding.max_len == 12 and loaded.vocab == VOCAB
    np.testing.assert_allclose(loaded.model((features, tokens)), expected, atol=1e-6)
    assert leftovers(tmp_path, {"model"}) == []


def test_vocabulary_save_crashing_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "vocab.json"
    VOCAB.save(path)
    real = pathlib.Path.write_bytes

    def torn(self, data):
        real(self, data[: len(data) // 2])
        raise Crash("disk full")

    monkeypatch.setattr(pathlib.Path, "write_bytes", torn)
    with pytest.raises(Crash):
        Vocabulary([*VOCAB.words, "blue"]).save(path)
    monkeypatch.undo()
    assert Vocabulary.load(path) == VOCAB and leftovers(tmp_path, {"vocab.json"}) == []


# ---------------------------------------------------------------------------------------------
# Feature cache entries
# ---------------------------------------------------------------------------------------------

def _npy(array, allow_pickle=False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, a=np.ones(3, np.float32))
    return buffer.getvalue()


GOOD = _npy(np.array([10.0, 20.0, 30.0], np.float32))
DAMAGE = {
    "truncated": GOOD[:-5],
    "header only": GOOD[:64],
    "empty": b"",
    "random bytes": bytes(range(256)),
    "nan": _npy(np.array([1.0, np.nan, 0.0], np.float32)),
    "wrong length": _npy(np.ones(5, np.float32)),
    "wrong dtype": _npy(np.ones(3, np.float64)),
    "2-d": _npy(np.ones((1, 3), np.float32)),
    "pickled object array": _npy(np.array([{"x": 1}], dtype=object), allow_pickle=True),
    "raw pickle": pickle.dumps(np.ones(3, np.float32)),
    "zip archive": _npz(),
    "broken zip": b"PK\x03\x04 not really",
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_cache_entry_is_detected_and_recomputed(tmp_path, damage):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(photo)
    cache_dir = tmp_path / "cache"
    encoder = CountingEncoder()
    list(iter_features([str(photo)], encoder, FeatureCache(IDENTITY, cache_dir)))
    entry = FeatureCache(IDENTITY, cache_dir)._path(content_key(str(photo)))
    assert entry.read_bytes() == GOOD

    entry.write_bytes(DAMAGE[damage])  # a crash, a bad disk or a stranger wrote this
    [batch] = list(iter_features([str(photo)], encoder, FeatureCache(IDENTITY, cache_dir)))
    assert encoder.encoded == 2 and batch.indices == [0]  # encoded again, not served
    np.testing.assert_array_equal(batch.features, [[10, 20, 30]])
    assert entry.read_bytes() == GOOD  # and the entry repaired
    assert leftovers(entry.parent, {entry.name}) == []


def test_cache_put_crashing_mid_write_leaves_no_entry(tmp_path, monkeypatch, caplog):
    cache = FeatureCache(IDENTITY, tmp_path)
    cache.put("ab" * 20, np.ones(3, np.float32))
    real = np.save

    def torn(file, array, **kwargs):
        real(file, array, **kwargs)
        with open(file, "r+b") as f:
            f.truncate(20)
        raise Crash("killed")

    monkeypatch.setattr(np, "save", torn)
    cache.put("ab" * 20, np.zeros(3, np.float32))  # replacing an entry
    cache.put("cd" * 20, np.zeros(3, np.float32))  # a new entry
    # the cache is a help: a failed write is logged, and the run goes on
    assert sum("feature cache: could not write" in r.getMessage() for r in caplog.records) == 2
    monkeypatch.undo()
    fresh = FeatureCache(IDENTITY, tmp_path)
    np.testing.assert_array_equal(fresh.get("ab" * 20), np.ones(3))
    assert fresh.get("cd" * 20) is None
    names = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert names == ["ab" * 20 + ".npy"]


# ---------------------------------------------------------------------------------------------
# Training checkpoints
# ---------------------------------------------------------------------------------------------


def test_backup_crashing_mid_save_keeps_the_previous_epoch(tmp_path, monkeypatch):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.ones((8, 2), np.float32), np.ones((8, 1), np.float32)
    backup = tmp_path / "backup"
    model.fit(x, y, epochs=2, verbose=0, callbacks=[AtomicBackupAndRestore(str(backup), delete_checkpoint=False)])
    saved = {p.name: p.read_bytes() for p in backup.iterdir()}
    assert json.loads(saved["training_metadata.json"])["epoch"] == 2

    def torn(self, filepath, **kwargs):
        Path(filepath).write_bytes(b"\x89HDF\r\n half")
        raise Crash("killed while saving the checkpoint")

    monkeypatch.setattr(keras.Model, "save_weights", torn)
    with pytest.raises(Crash):
        model.fit(x, y, epochs=4, verbose=0, callbacks=[AtomicBackupAndRestore(str(backup))])
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in backup.iterdir()} == saved  # untouched, no temporaries

    resumed = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    resumed.compile("sgd", "mse")
    history = resumed.fit(x, y, epochs=4, verbose=0, callbacks=[AtomicBackupAndRestore(str(backup))])
    assert history.epoch == [2, 3] and not backup.exists()


# ---------------------------------------------------------------------------------------------
# Killed processes
# ---------------------------------------------------------------------------------------------


def cli_env(home: Path) -> dict:
    return {**os.environ, "CAPTIONER_HOME": str(home), "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}


def complete_rows(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for i in range(200):
        render_scene(random_scene(rng), 64).save(folder / f"photo_{i:03d}.jpg", quality=90)
    return folder


def read_rows(path: Path) -> list[dict]:
    """Every row of a caption output; fails on a torn or malformed row."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), "the file ends in a torn row"
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines()]
        assert all(set(row) == set(OUTPUT_FIELDS) for row in rows)
        return rows
    records = list(csv.reader(io.StringIO(text, newline="")))
    assert tuple(records[0]) == OUTPUT_FIELDS
    assert all(len(r) == len(OUTPUT_FIELDS) for r in records[1:]), "a row with missing fields"
    return [dict(zip(OUTPUT_FIELDS, r)) for r in records[1:]]


KILL_AFTER = 80  # rows on disk; 200 photos in batches of 8 leave 15 batches to spare


def test_caption_killed_half_way_then_resumed(photo_folder, trained_run, trained_captioner, tmp_path):
    """SIGKILL `captioner caption` (CSV and JSONL at once) once rows are on disk, rerun with
    --resume: every photo is in the file exactly once, with the caption a clean run gives."""
    model = str(trained_run[0] / "model")
    outputs = [tmp_path / "captions.csv", tmp_path / "captions.jsonl"]
    env = cli_env(tmp_path / "home")

    def start(out: Path, *extra: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "captioner", "caption", str(photo_folder), "-o", str(out),
                   "--model", model, "--batch-size", "8", *extra]
        with open(out.with_suffix(".log"), "w") as log:  # the child keeps its own copy of the handle
            return subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log)

    running = {out: start(out) for out in outputs}
    at_kill = {}
    deadline = time.monotonic() + 300
    while running and time.monotonic() < deadline:
        for out, process in list(running.items()):
            header = out.suffix == ".csv"
            if complete_rows(out) >= header + KILL_AFTER:
                process.send_signal(signal.SIGKILL)
                process.wait()
                at_kill[out] = (complete_rows(out) - header, not out.read_bytes().endswith(b"\n"))
                del running[out]
            elif process.poll() is not None:
                pytest.fail(f"{out.name}: the run ended (code {process.returncode}) before it could be killed")
        time.sleep(0.005)
    assert not running, "no rows written within the time limit"
    for out, (rows, torn) in at_kill.items():
        assert KILL_AFTER <= rows < 200, (out.name, rows)
        print(f"{out.name}: killed with {rows}/200 rows written" + (" and a torn row" if torn else ""))

    resumed = {out: start(out, "--resume") for out in outputs}
    for out, process in resumed.items():
        assert process.wait(timeout=300) == 0, out.with_suffix(".log").read_text()
        assert "resuming: " in out.with_suffix(".log").read_text()

    paths = sorted(str(p) for p in photo_folder.iterdir())
    reference = {r.source: r for r in trained_captioner.caption(paths)}
    for out in outputs:
        rows = read_rows(out)
        counts = Counter(row["image"] for row in rows)
        assert set(counts) == set(paths) and set(counts.values()) == {1}, out.name
        for row in rows:
            expected = reference[row["image"]]
            assert not row["error"] and row["caption"] == expected.caption, row
            assert abs(float(row["log_prob"]) - expected.log_prob) < 1e-3, row


EPOCHS = 4


def test_killed_training_resumes_from_its_last_epoch(tmp_path):
    data = make_shapes_dataset(tmp_path / "shapes", n_images=80)  # small: each epoch takes a moment
    run = tmp_path / "run"
    command = [sys.executable, "-m", "captioner", "train", "--data", str(data), "--output", str(run),
               "--preset", "tiny", "--encoder", "tiny", "--epochs", str(EPOCHS), "--cache-dir", str(tmp_path / "cache")]
    env = cli_env(tmp_path / "home")
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log)
    metadata = run / "backup" / "training_metadata.json"
    deadline = time.monotonic() + 300
    while not metadata.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, f"training ended before its first backup:\n{(tmp_path / 'first.log').read_text()}"
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = json.loads(metadata.read_text())["epoch"]
    assert 1 <= done < EPOCHS
    print(f"training killed after {done} of {EPOCHS} epochs")

    second = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    epochs_run = [line.split()[1] for line in second.stdout.splitlines() if line.startswith("Epoch ")]
    assert epochs_run == [f"{e}/{EPOCHS}" for e in range(done + 1, EPOCHS + 1)]  # continued, not restarted
    with open(run / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    epochs = [int(row["epoch"]) for row in history]
    # Keras numbers epochs from 0; the killed run may not have logged its last epoch yet
    assert epochs == sorted(set(epochs)) and epochs[-1] == EPOCHS - 1 and set(range(done, EPOCHS)) <= set(epochs)
    assert not (run / "backup").exists()
    bundle = load_bundle(run / "model")
    assert bundle.encoder["name"] == "tiny" and bundle.info["best"]["epoch"] >= 1
    # the training time counts the killed run's epochs too, not only the resumed ones
    best = bundle.info["best"]["epoch"]
    logged = sum(float(r["seconds"]) for r in history if int(r["epoch"]) < best)
    assert bundle.info["train_seconds"] == pytest.approx(logged, abs=0.05 * EPOCHS) and logged > 0
    assert leftovers(run, {"model", "history.csv"}) == []


def test_a_fifo_or_folder_planted_in_the_cache_is_skipped(tmp_path):
    """A cache entry that is a named pipe would block np.load forever; a folder in an entry's place
    would stop every write. Both are treated as missing, and encoding goes on."""
    cache = FeatureCache(IDENTITY, tmp_path)
    pipe_key, dir_key = "ab" * 20, "cd" * 20
    cache.put(pipe_key, np.ones(3, np.float32))
    entry = cache._path(pipe_key)
    entry.unlink()
    os.mkfifo(entry)
    cache._path(dir_key).parent.mkdir(parents=True, exist_ok=True)
    cache._path(dir_key).mkdir()
    fresh = FeatureCache(IDENTITY, tmp_path)
    assert fresh.get(pipe_key) is None and fresh.get(dir_key) is None  # returns at once
    fresh.put(dir_key, np.ones(3, np.float32))  # logged, not raised
    np.testing.assert_array_equal(fresh.get(dir_key), np.ones(3))  # still served from memory
