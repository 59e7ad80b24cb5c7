"""Familiarity: how close a photo's feature lies to the model's training photos', calibrated on dev;
kept in the bundle, checked when loaded, carried by every result."""
import hashlib
import json

import numpy as np
import pytest
from helpers import edit_config

from captioner.bundle import Bundle, BundleError, load_bundle
from captioner.encoder import ImageEncoder
from captioner.familiarity import FILENAME, FamiliaritySettings, add_familiarity, build
from captioner.features import encode_photos
from captioner.model import ShowAndTell
from captioner.text import Vocabulary

VOCAB = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "red", "circle"])
ENCODER = {"name": "tiny", "weights_id": "random:seed=0", "image_size": 64, "feature_dim": 8}


def noise_photos(count: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_shapes_photos_score_above_random_noise(shapes):
    """A reference set of generated shapes photos (tiny encoder): unseen shapes photos are all closer
    to it than any photo of random noise."""
    encoder = ImageEncoder("tiny")
    train, dev, test = (encode_photos(shapes.images, shapes.splits[s], encoder, progress=False)[1]
                        for s in ("train", "dev", "test"))
    familiarity = build(train, dev)
    shapes_scores, noise_scores = familiarity.scores(test), familiarity.scores(encoder(noise_photos(20)))
    assert shapes_scores.min() > noise_scores.max()
    assert (noise_scores < familiarity.threshold).all()
    assert familiarity.dev_pass == pytest.approx(0.95, abs=0.05) and familiarity.dev_photos == len(dev)


def test_results_of_a_trained_bundle_carry_the_score(trained_captioner, shapes):
    """`captioner train` adds familiarity data; captions of noise photos are flagged, shapes photos mostly not."""
    assert trained_captioner.bundle.familiarity is not None
    photos = [shapes.images[i] for i in shapes.splits["test"]]
    shapes_results = trained_captioner.caption(photos)
    noise_results = trained_captioner.caption(list(noise_photos(5)))
    assert all(r.unfamiliar and r.familiarity < r.familiarity_threshold for r in noise_results)
    assert sum(r.unfamiliar for r in shapes_results) <= 0.2 * len(photos)
    assert min(r.familiarity for r in shapes_results) > max(r.familiarity for r in noise_results)
    assert all(r.labels == () for r in shapes_results)  # the tiny encoder has no ImageNet head


def small_familiarity():
    rng = np.random.default_rng(0)
    return build(rng.random((40, 8)), rng.random((10, 8)), FamiliaritySettings(reference_size=16, neighbours=3))


@pytest.fixture
def bundle_dir(tmp_path):
    return Bundle(ShowAndTell(len(VOCAB), 8, embed_dim=4, units=6), VOCAB, ENCODER,
                  familiarity=small_familiarity()).save(tmp_path / "b")


def test_the_data_round_trips_through_the_bundle(bundle_dir):
    saved = json.loads((bundle_dir / "config.json").read_text())["familiarity"]
    loaded = load_bundle(bundle_dir, load_decoder=False).familiarity
    assert loaded.reference.shape == (16, 8) and loaded.neighbours == 3 and loaded.threshold == saved["threshold"]
    features = np.random.default_rng(2).random((5, 8))
    np.testing.assert_array_equal(loaded.scores(features), small_familiarity().scores(features))


def test_adding_it_keeps_the_rest_of_the_bundle(tmp_path):
    path = Bundle(ShowAndTell(len(VOCAB), 8, embed_dim=4, units=6), VOCAB, ENCODER).save(tmp_path / "b")
    assert load_bundle(path).familiarity is None  # a bundle without it: no score
    edit_config(path, litert={"decoder.tflite": "a" * 64}, info={"note": "kept"})
    rng = np.random.default_rng(0)
    add_familiarity(path, rng.random((30, 8)), rng.random((10, 8)))
    config = json.loads((path / "config.json").read_text())
    assert config["litert"] == {"decoder.tflite": "a" * 64} and config["info"] == {"note": "kept"}
    assert load_bundle(path).familiarity.dev_photos == 10
    with pytest.raises(ValueError, match="features have 5 values, the bundle's encoder gives 8"):
        add_familiarity(path, rng.random((30, 5)), rng.random((10, 5)))


def rewrite_file(bundle_dir, array) -> None:
    """Replace the data file and make the config vouch for it, as a hand-made bundle would."""
    np.save(bundle_dir / FILENAME, array, allow_pickle=True)
    entry = json.loads((bundle_dir / "config.json").read_text())["familiarity"]
    edit_config(bundle_dir, familiarity={**entry, "sha256": hashlib.sha256((bundle_dir / FILENAME).read_bytes())
                                         .hexdigest()})


def unit_rows(count: int, dim: int = 8) -> np.ndarray:
    x = np.random.default_rng(0).random((count, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


@pytest.mark.parametrize("change, message", [
    ({"threshold": "high"}, "familiarity 'threshold' must be a number from -1 to 1, got 'high'"),
    ({"threshold": 2}, "familiarity 'threshold' must be a number from -1 to 1, got 2"),
    ({"neighbours": 0}, "familiarity 'neighbours' must be a whole number from 1"),
    ({"neighbours": 17}, "the score needs a centre and 17 to 65,536 photos"),
    ({"dev_pass": 0}, "familiarity 'dev_pass' must be a number above 0 and at most 1, got 0"),
    ({"dev_photos": True}, "familiarity 'dev_photos' must be a positive whole number, got True"),
    ({"sha256": "b" * 64}, "familiarity.npy: does not match the SHA-256 in config.json"),
    ({"sha256": None}, "familiarity 'sha256' must be 64 hex digits"),
])
def test_malformed_config_entries_are_refused(bundle_dir, change, message):
    entry = json.loads((bundle_dir / "config.json").read_text())["familiarity"]
    edit_config(bundle_dir, familiarity={**entry, **change})
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace(")", r"\)")) as refused:
        load_bundle(bundle_dir, load_decoder=False)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("array, message", [
    (unit_rows(17).astype(np.float32), "must hold one float16 array"),
    (unit_rows(17)[:, :5], r"holds an array \[17, 5\]; the encoder gives 8 values a photo"),
    (unit_rows(17)[:2], r"the score needs a centre and 3 to 65,536 photos"),
    (np.full((17, 8), 0.5, np.float16), "reference features are not all unit vectors"),
    (np.vstack([np.full((1, 8), np.inf, np.float16), unit_rows(16)]), "its centre is not finite"),
    (np.array([{"a": 1}, None], dtype=object), "not a NumPy array file"),  # a pickle is never read
])
def test_malformed_data_files_are_refused(bundle_dir, array, message):
    rewrite_file(bundle_dir, array)
    with pytest.raises(BundleError, match=message) as refused:
        load_bundle(bundle_dir, load_decoder=False)
    assert str(refused.value).startswith(str(bundle_dir / FILENAME)) and "\n" not in str(refused.value)


def test_a_missing_file_is_refused(bundle_dir):
    (bundle_dir / FILENAME).unlink()
    with pytest.raises(BundleError, match="familiarity.npy: missing, or not a regular file, though config.json"):
        load_bundle(bundle_dir, load_decoder=False)
