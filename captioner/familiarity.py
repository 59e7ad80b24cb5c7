"""How familiar a photo is to a model: how close its pooled feature lies to its training photos'.

A decoder trained on people and dogs writes a confident sentence about people or dogs for any
photo at all; the encoder's feature tells when a photo is unlike all of them. A bundle may keep
a reference set (training photos' pooled features, centred on their mean and L2-normalised) and
a threshold:

    score(photo) = mean cosine similarity of its centred feature to its `neighbours` nearest references

and the threshold is the score that a stated share (`dev_pass`) of the dev photos reach: with
0.95, one dev photo in twenty is called unfamiliar, so a photo below it is less like the training
photos than 95 % of photos from the same collection. Centring matters: pooled ReLU features all
share one large positive direction, so without it every photo, even random noise, lies at a high
cosine similarity to every other. The file holds only numbers
(`familiarity.npy`, read with `allow_pickle=False`): one float16 array whose row 0 is the centre
and whose other rows are the reference features; `load` checks everything it reads.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

FILENAME = "familiarity.npy"
MAX_REFERENCE = 65_536  # reference rows a bundle may hold (Flickr8k's whole train split is 6,000)
MAX_BYTES = 256 << 20  # MAX_REFERENCE rows of 1,280 float16 values are 168 MB
# What an unfamiliar photo means, in plain words (the CLI's warning; the app says more).
UNFAMILIAR = "unlike the photos the model learned from; its caption may well be wrong"
_CHUNK = 512  # features scored (or grids pooled) at once: bounds the similarity matrix in memory


class FamiliarityError(ValueError):
    """Familiarity data that cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class FamiliaritySettings:
    """How a bundle's familiarity data is built from its training and dev photos."""

    reference_size: int = 2048  # training photos kept as the reference set (a random subset)
    neighbours: int = 5  # a photo's score is its mean similarity to this many nearest references
    dev_pass: float = 0.95  # share of the dev photos that the threshold lets pass
    seed: int = 0  # of the reference subset

    def __post_init__(self) -> None:
        if not 1 <= self.neighbours <= self.reference_size <= MAX_REFERENCE:
            raise ValueError(f"familiarity: need 1 <= neighbours ({self.neighbours}) <= reference_size "
                             f"({self.reference_size}) <= {MAX_REFERENCE:,}")
        if not 0 < self.dev_pass < 1:
            raise ValueError(f"familiarity: dev_pass must be between 0 and 1, got {self.dev_pass}")


@dataclass(frozen=True, eq=False)
class Familiarity:
    """A reference set [K, D] (unit rows, float16) around a centre [D] (float16), and the threshold
    calibrated on dev photos."""

    center: np.ndarray
    reference: np.ndarray
    threshold: float  # scores below it are unfamiliar
    neighbours: int
    dev_pass: float  # the share of the calibration photos that scored at or above the threshold
    dev_photos: int  # how many photos it was calibrated on

    @cached_property
    def _reference_t(self) -> np.ndarray:
        # float32 once: NumPy has no fast float16 product, and converting per batch cost as much as scoring.
        return np.ascontiguousarray(self.reference.astype(np.float32).T)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Familiarity of pooled features [N, D]: a cosine similarity, -1..1; higher is closer."""
        features = _unit_rows(np.asarray(features, np.float32) - self.center.astype(np.float32))
        reference_t = self._reference_t
        out = np.empty(len(features), np.float32)
        for start in range(0, len(features), _CHUNK):
            similarity = features[start : start + _CHUNK] @ reference_t
            nearest = -np.partition(-similarity, self.neighbours - 1, axis=1)[:, : self.neighbours]
            out[start : start + _CHUNK] = nearest.mean(axis=1)
        return out

    def file_bytes(self) -> bytes:
        """The `.npy` file: the centre, then the reference set (its SHA-256 goes into the bundle's config)."""
        buffer = io.BytesIO()
        np.save(buffer, np.vstack([self.center[None], self.reference]).astype(np.float16), allow_pickle=False)
        return buffer.getvalue()

    def config(self) -> dict:
        """The bundle config's `familiarity` entry."""
        return {"sha256": hashlib.sha256(self.file_bytes()).hexdigest(), "threshold": self.threshold,
                "neighbours": self.neighbours, "dev_pass": round(self.dev_pass, 6), "dev_photos": self.dev_photos}


def pooled(features: np.ndarray) -> np.ndarray:
    """Pooled vectors [N, D] from what a decoder reads: the vectors themselves, or the means of
    spatial maps [N, H*W, C] (an attention decoder's; the encoder's pooled vector is that mean)."""
    if features.ndim == 2:
        return np.asarray(features, np.float32)
    out = np.empty((len(features), features.shape[-1]), np.float32)
    for start in range(0, len(features), _CHUNK):  # a memory-mapped file of grids is read a piece at a time
        out[start : start + _CHUNK] = np.asarray(features[start : start + _CHUNK], np.float32).mean(axis=1)
    return out


def build(train_features: np.ndarray, dev_features: np.ndarray,
          settings: FamiliaritySettings = FamiliaritySettings()) -> Familiarity:
    """Reference set from training photos' pooled features [N, D]; threshold from dev photos'
    (never the reference photos themselves: each would find itself at similarity 1)."""
    if len(train_features) < settings.neighbours or not len(dev_features):
        raise FamiliarityError(f"familiarity needs at least {settings.neighbours} training photos and one dev "
                               f"photo, got {len(train_features)} and {len(dev_features)}")
    train_features = np.asarray(train_features, np.float32)
    center = train_features.mean(axis=0).astype(np.float16)
    rng = np.random.default_rng(settings.seed)
    keep = np.sort(rng.choice(len(train_features), min(settings.reference_size, len(train_features)), replace=False))
    reference = _unit_rows(train_features[keep] - center.astype(np.float32)).astype(np.float16)
    probe = Familiarity(center, reference, 0.0, settings.neighbours, 1.0, len(dev_features))
    dev_scores = probe.scores(dev_features)  # scored against the float16 set the bundle will hold
    threshold = float(np.quantile(dev_scores, 1 - settings.dev_pass, method="lower"))
    return Familiarity(center, reference, threshold, settings.neighbours, float(np.mean(dev_scores >= threshold)),
                       len(dev_features))


def load(data: bytes, entry: dict, feature_dim: int) -> Familiarity:
    """Familiarity from a bundle's file content and its config entry (whose fields the bundle's
    loader has checked); `FamiliarityError` says what is wrong with the file."""
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise FamiliarityError("does not match the SHA-256 in config.json (replaced or damaged)")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FamiliarityError(f"not a NumPy array file ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(array, np.ndarray) or array.dtype != np.float16 or array.ndim != 2:
        raise FamiliarityError("must hold one float16 array [1 + photos, features]")
    center, reference = array[0], array[1:]
    if array.shape[1] != feature_dim or not entry["neighbours"] <= len(reference) <= MAX_REFERENCE:
        raise FamiliarityError(f"holds an array {list(array.shape)}; the encoder gives {feature_dim} values a photo "
                               f"and the score needs a centre and {entry['neighbours']} to {MAX_REFERENCE:,} photos")
    norms = np.linalg.norm(reference.astype(np.float32), axis=1)
    if not np.isfinite(center).all() or not np.isfinite(norms).all() or np.abs(norms - 1).max() > 1e-2:
        raise FamiliarityError("its centre is not finite or its reference features are not all unit vectors")
    return Familiarity(center, reference, float(entry["threshold"]), entry["neighbours"], float(entry["dev_pass"]),
                       entry["dev_photos"])


def add_familiarity(bundle_dir: str | Path, train_features: np.ndarray, dev_features: np.ndarray,
                    settings: FamiliaritySettings = FamiliaritySettings()) -> Familiarity:
    """Give a bundle familiarity data built from its training and dev photos' features (pooled
    [N, D], or the spatial maps an attention decoder reads). The file is written first and
    config.json last, so a crash leaves the old bundle."""
    from captioner.bundle import add_familiarity_file, load_bundle

    bundle = load_bundle(bundle_dir, load_decoder=False)
    bundle.refuse_ensemble("give familiarity data to")
    train, dev = pooled(train_features), pooled(dev_features)
    if train.shape[1] != bundle.encoder["feature_dim"]:
        raise FamiliarityError(f"{bundle_dir}: features have {train.shape[1]} values, the bundle's encoder "
                               f"gives {bundle.encoder['feature_dim']}")
    familiarity = build(train, dev, settings)
    add_familiarity_file(bundle, familiarity)
    return familiarity


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
