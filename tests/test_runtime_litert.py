"""The LiteRT runtime against the TensorFlow one, on the tiny model trained on generated photos."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import caption_on_litert_in_a_new_process

from captioner.bundle import BundleError, load_bundle
from captioner.captioner import Captioner
from captioner.evaluation import evaluate
from captioner.images import load_image
from captioner.runtime_litert import LiteRTEncoder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # trains the tiny model (shared session fixture)


@pytest.fixture(scope="module")
def model_dir(trained_run) -> Path:
    return trained_run[0] / "model"


@pytest.fixture(scope="module")
def both(model_dir):
    return Captioner.load(model_dir, runtime="tf"), Captioner.load(model_dir, runtime="litert")


def test_training_writes_the_runtime_files_and_auto_picks_them(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert sorted(config["litert"]) == ["decoder.tflite", "encoder.tflite"]
    for name, digest in config["litert"].items():
        assert hashlib.sha256((model_dir / name).read_bytes()).hexdigest() == digest
    assert Captioner.load(model_dir).runtime == "litert"


def test_features_match_tensorflows(both, shapes):
    tf_run, lite_run = both
    photos = np.stack([load_image(shapes.images[i], tf_run.encoder.image_size) for i in shapes.splits["dev"][:16]])
    np.testing.assert_allclose(lite_run.encoder(photos), tf_run.encoder(photos), atol=1e-4)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_captions_and_bleu_match_tensorflows(both, shapes, method, tmp_path):
    tf_run, lite_run = both
    reports = {}
    for name, captioner in (("tf", tf_run), ("litert", lite_run)):
        options = replace(captioner.options, method=method, beam_size=3)
        reports[name] = evaluate(captioner, shapes, "dev", options, coco=False, output=tmp_path / name,
                                 progress=False)
    hyps = {name: (tmp_path / name / "per_image.jsonl").read_text().splitlines() for name in reports}
    same = sum(a == b for a, b in zip(hyps["tf"], hyps["litert"]))
    assert same >= 0.99 * len(hyps["tf"]), f"{same} of {len(hyps['tf'])} captions agree"
    assert abs(reports["tf"]["scores"]["BLEU-4"] - reports["litert"]["scores"]["BLEU-4"]) <= 0.1


def test_beams_and_log_probs_match_tensorflows(both, shapes):
    tf_run, lite_run = both
    photos = [shapes.images[i] for i in shapes.splits["dev"][:6]]
    for a, b in zip(tf_run.caption(photos, num_results=3), lite_run.caption(photos, num_results=3)):
        assert [x.caption for x in a.beams] == [x.caption for x in b.beams]
        np.testing.assert_allclose([x.log_prob for x in a.beams], [x.log_prob for x in b.beams], atol=1e-3)


def test_the_caption_path_imports_neither_tensorflow_nor_keras(model_dir, shapes):
    photo = shapes.images[shapes.splits["dev"][0]]
    [caption], heavy, stderr = caption_on_litert_in_a_new_process(model_dir, photo)
    assert caption and heavy == []
    assert stderr == "", stderr  # not even LiteRT's XNNPACK notice


def test_a_replaced_runtime_file_is_refused(model_dir, tmp_path):
    copy = shutil.copytree(model_dir, tmp_path / "bundle")
    data = bytearray((copy / "decoder.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "decoder.tflite").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"decoder.tflite: does not match the SHA-256 in config.json"):
        Captioner.load(copy, runtime="litert")


def test_a_runtime_file_of_other_shapes_is_refused(model_dir, tmp_path):
    """A file whose hash the config vouches for, but whose inputs are not what the config says."""
    copy = shutil.copytree(model_dir, tmp_path / "bundle")
    (copy / "encoder.tflite").write_bytes((copy / "decoder.tflite").read_bytes())  # a valid model, wrong one
    config = json.loads((copy / "config.json").read_text())
    config["litert"]["encoder.tflite"] = config["litert"]["decoder.tflite"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match=r"encoder.tflite: has no 'features' signature"):
        Captioner.load(copy, runtime="litert")


def test_runtime_choice_without_files(model_dir, tmp_path):
    copy = shutil.copytree(model_dir, tmp_path / "bundle")
    config = json.loads((copy / "config.json").read_text())
    config["litert"] = {}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="cannot run on LiteRT: the bundle has no LiteRT files"):
        Captioner.load(copy, runtime="litert")
    assert Captioner.load(copy).runtime == "tf"  # auto falls back
    assert not isinstance(Captioner.load(model_dir, runtime="tf").encoder, LiteRTEncoder)


def test_export_adds_the_files_to_an_existing_bundle(model_dir, tmp_path):
    copy = shutil.copytree(model_dir, tmp_path / "bundle")
    for name in ("encoder.tflite", "decoder.tflite"):
        (copy / name).unlink()
    config = json.loads((copy / "config.json").read_text())
    config["litert"] = {}
    (copy / "config.json").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "captioner", "export", "--model", str(copy)], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert sorted(load_bundle(copy, load_decoder=False).litert) == ["decoder.tflite", "encoder.tflite"]
    assert Captioner.load(copy).runtime == "litert"


def test_export_adds_familiarity_data_to_a_bundle_without_it(model_dir, tmp_path, shapes_root):
    copy = shutil.copytree(model_dir, tmp_path / "bundle")
    (copy / "familiarity.npy").unlink()
    config = json.loads((copy / "config.json").read_text())
    del config["familiarity"]
    (copy / "config.json").write_text(json.dumps(config))
    assert load_bundle(copy, load_decoder=False).familiarity is None
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "captioner", "export", "--model", str(copy), "--familiarity",
                           str(shapes_root), "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    familiarity = load_bundle(copy, load_decoder=False).familiarity
    assert familiarity is not None and 0.9 <= familiarity.dev_pass <= 1.0
    assert sorted(load_bundle(copy, load_decoder=False).litert) == ["decoder.tflite", "encoder.tflite"]


def test_an_int8_encoder_is_exported_on_request_and_preferred(model_dir, tmp_path, shapes_root, shapes):
    copy = shutil.copytree(model_dir, tmp_path / "bundle")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "captioner", "export", "--model", str(copy),
                           "--int8-calibration", str(shapes_root)], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    # the converter's calibration notice and TensorFlow's interpreter warning are not the user's business
    assert "fully_quantize" not in done.stderr and "deprecated" not in done.stderr, done.stderr
    assert sorted(load_bundle(copy, load_decoder=False).litert) == ["decoder.tflite", "encoder.int8.tflite",
                                                                    "encoder.tflite"]
    fast, exact = Captioner.load(copy), Captioner.load(copy, runtime="litert-float")
    assert fast.encoder.int8 and not exact.encoder.int8
    photos = np.stack([load_image(shapes.images[i], fast.encoder.image_size) for i in shapes.splits["dev"][:8]])
    a, b = fast.encoder(photos), exact.encoder(photos)
    assert a.shape == b.shape and not np.array_equal(a, b)  # really the quantised network
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9  # and still the same features, roughly
