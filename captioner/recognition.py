"""What the encoder recognises: its ImageNet labels, from the pooled feature the decoder reads too.

The encoder network ends in global average pooling and a 1000-class softmax layer; captioning
keeps only the pooled vector. That layer is one matrix and a bias, and it is inside the
encoder's converted weights file already (scripts/convert_encoder_weights.py writes the whole
network), so the labels cost one small product in NumPy, on either runtime, with no TensorFlow:
`softmax(pooled @ W + b)` is exactly what the network's own head computes.

The head is read with h5py from the weights file whose SHA-256 is the bundle's `weights_id`,
so labels never come from other weights than the features. Encoders without such a file (the
keras.applications downloads, random ones) simply have no labels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from captioner import paths
from captioner.fileio import sha256_file

HEAD_LAYER = "predictions"  # the name captioner.networks gives the 1000-class ImageNet softmax layer
CLASSES = 1000
CLASS_NAMES = paths.ENCODER_ASSETS / "imagenet_classes.txt"
TOP_LABELS = 5  # labels a result carries

Labels = tuple[tuple[str, float], ...]  # (class name, probability), most probable first


class ImageNetHead:
    """The encoder's ImageNet classifier on pooled features: W [D, 1000], b [1000], class names."""

    def __init__(self, kernel: np.ndarray, bias: np.ndarray, names: list[str]):
        if kernel.ndim != 2 or bias.shape != (kernel.shape[1],) or len(names) != kernel.shape[1]:
            raise ValueError(f"head of shape {kernel.shape} + {bias.shape} does not fit {len(names)} class names")
        self.kernel, self.bias, self.names = kernel.astype(np.float32), bias.astype(np.float32), names

    @classmethod
    def for_encoder(cls, identity: dict) -> ImageNetHead | None:
        """The head of the encoder `identity` names (a bundle's `encoder`), or None when its weights
        file is not on this machine, is not the one the identity names, or has no ImageNet head."""
        weights_id = str(identity.get("weights_id", ""))
        if not weights_id.startswith("sha256:"):
            return None  # random or downloaded weights: no converted file to read a head from
        for path in paths.encoder_weights_files(str(identity.get("name"))):
            if path.is_file() and "sha256:" + sha256_file(path) == weights_id:
                return cls.from_weights_file(path, int(identity["feature_dim"]))
        return None

    @classmethod
    def from_weights_file(cls, path: Path, feature_dim: int) -> ImageNetHead | None:
        """The head inside a Keras `.weights.h5` file of an encoder network; None if it has none."""
        import h5py  # Keras's own weights format; h5py imports no TensorFlow

        # Keras 3 files name each layer's group after its class ("dense", "dense_1", ...), not after
        # the layer: the head is the one Dense layer mapping feature_dim values to the classes.
        heads = []
        with h5py.File(path, "r") as f:
            for name, group in f.get("layers", {}).items():
                variables = group.get("vars") if name.startswith("dense") else None
                if (variables is not None and set(variables) == {"0", "1"}
                        and variables["0"].shape == (feature_dim, CLASSES) and variables["1"].shape == (CLASSES,)):
                    heads.append((np.asarray(variables["0"]), np.asarray(variables["1"])))
        return cls(*heads[0], class_names()) if len(heads) == 1 else None

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities [N, 1000] of pooled features [N, D]."""
        logits = np.asarray(features, np.float32) @ self.kernel + self.bias
        logits -= logits.max(axis=1, keepdims=True)  # softmax without overflow
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def top(self, features: np.ndarray, k: int = TOP_LABELS) -> list[Labels]:
        """The `k` most probable labels of each pooled feature [N, D]."""
        probabilities = self.probabilities(features)
        best = np.argsort(-probabilities, axis=1)[:, :k]
        return [tuple((self.names[i], float(p[i])) for i in row) for row, p in zip(best, probabilities)]


def class_names() -> list[str]:
    """The 1000 ImageNet class names in index order, each by its first (commonest) name: `tabby`
    for "tabby, tabby cat"."""
    return [line.split(",")[0].strip() for line in CLASS_NAMES.read_text(encoding="utf-8").splitlines()]
