"""`captioner train --distribute mirrored` on two logical CPU devices against one device.

Logical devices must be configured before TensorFlow initialises its devices, so the runs happen
in a fresh Python process; it trains the tiny model on the shapes data three ways (one device;
mirrored; mirrored interrupted after two epochs and rerun) and the test reads what they wrote.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EPOCHS = 4
# Mirrored training averages per-device token means: one device's global mean exactly when both
# halves of a batch hold as many words, close otherwise (batches are bucketed by length), and
# dropout draws differ per device. Measured gap on the shapes data (4 epochs, loss and val_loss):
# at most 1.6 %; allowed: 3 %.
LOSS_RTOL = 0.03

SCRIPT = r"""
import sys
from pathlib import Path

from captioner.quiet_tensorflow import tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from captioner import training
from captioner.cli import main

shapes, out = sys.argv[1], Path(sys.argv[2])
common = ["train", "--data", shapes, "--preset", "tiny", "--encoder", "tiny", "--epochs", "EPOCHS",
          "--cache-dir", str(out / "cache")]
assert main([*common, "--output", str(out / "single")]) == 0
assert main([*common, "--output", str(out / "mirrored"), "--distribute", "mirrored"]) == 0

# Interrupt a mirrored run at the start of its third epoch, as a kill would, then rerun it.
start = training.EpochTimer.on_epoch_begin
def stop_at_third(self, epoch, logs=None):
    if epoch == 2:
        raise KeyboardInterrupt
    start(self, epoch, logs)
training.EpochTimer.on_epoch_begin = stop_at_third
assert main([*common, "--output", str(out / "resumed"), "--distribute", "mirrored"]) == 130
assert (out / "resumed" / "backup").exists()
training.EpochTimer.on_epoch_begin = start
assert main([*common, "--output", str(out / "resumed"), "--distribute", "mirrored"]) == 0
print("replicas", training.make_strategy("mirrored").num_replicas_in_sync)
""".replace("EPOCHS", str(EPOCHS))


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(shapes_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distribute")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(shapes_root), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replicas 2" in done.stdout
    return out


@pytest.mark.slow
def test_mirrored_loss_curve_matches_one_device(runs):
    single, mirrored = _history(runs / "single"), _history(runs / "mirrored")
    assert [int(r["epoch"]) for r in mirrored] == list(range(EPOCHS))
    for one, two in zip(single, mirrored):
        for key in ("loss", "val_loss"):
            assert float(two[key]) == pytest.approx(float(one[key]), rel=LOSS_RTOL), (key, one["epoch"])
    assert float(mirrored[-1]["loss"]) < 0.8 * float(mirrored[0]["loss"])  # it learned


@pytest.mark.slow
def test_mirrored_runs_resume_and_write_a_working_bundle(runs, tiny_encoder, shapes):
    from captioner.bundle import load_bundle
    from captioner.captioner import Captioner

    resumed = _history(runs / "resumed")
    assert [int(r["epoch"]) for r in resumed] == list(range(EPOCHS))  # epochs 3-4 came from the rerun
    assert not (runs / "resumed" / "backup").exists()  # removed once training completed
    for run in ("mirrored", "resumed"):
        bundle = load_bundle(runs / run / "model")
        best = bundle.info["best"]
        assert 1 <= best["epoch"] <= EPOCHS and "val_bleu4" in best
        photo = shapes.images[shapes.splits["test"][0]]
        assert Captioner(bundle, tiny_encoder).caption(photo).caption
    config = json.loads((runs / "mirrored" / "model" / "config.json").read_text())
    assert config["info"]["train_config"]["epochs"] == EPOCHS
