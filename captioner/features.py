"""Image features: batched extraction (photos decoded on parallel threads) with a content-keyed cache.

A feature is cached per (encoder, weights, image content), so a second run over the same
photos encodes nothing, and a renamed or moved photo is still found. A feature is a pooled
vector [D] (float32) or, for attention decoders, a spatial map [H*W, C] (float16, its own cache).
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from captioner.errors import EncoderError
from captioner.fileio import atomic_save, sha256_file
from captioner.images import LOADER_VERSION, MAX_PIXELS, ImageError, ImageSource, describe_source, load_image

log = logging.getLogger(__name__)
# Threads decoding photos: enough to keep ahead of the encoder on a few cores.
_DECODE_THREADS = min(8, 2 * (os.cpu_count() or 1))


def content_key(source: ImageSource) -> str:
    """A hash of what the photo is: its file bytes, or its pixels for in-memory images."""
    h = hashlib.sha256()
    if isinstance(source, bytes):  # a file's contents: the key the file itself gets
        h.update(source)
    elif isinstance(source, np.ndarray):
        h.update(f"{source.shape}{source.dtype}".encode())
        h.update(np.ascontiguousarray(source).tobytes())
    elif isinstance(source, Image.Image):
        h.update(f"{source.size}{source.mode}".encode())
        h.update(source.tobytes())
    else:  # OSError (including "not a regular file") is reported by the caller as an ImageError
        return sha256_file(source)[:40]
    return h.hexdigest()[:40]


class GridEncoder:
    """An encoder (`ImageEncoder`, `LiteRTEncoder`) seen as giving each photo's spatial map,
    float16 [H*W, C]: what an attention decoder reads. It has the encoder's identity (the map
    comes from the same weights), so `iter_features` and a grid `FeatureCache` use it like the
    encoder itself."""

    def __init__(self, encoder):
        if getattr(encoder, "grid_shape", None) is None:
            raise EncoderError(f"encoder {encoder.name} gives no spatial map (it does not end in average pooling)")
        self.encoder, self.name, self.image_size = encoder, encoder.name, encoder.image_size
        self.grid_shape = encoder.grid_shape
        self.feature_shape = (self.grid_shape[0] * self.grid_shape[1], encoder.feature_dim)

    def __call__(self, images) -> np.ndarray:
        # float16 holds these activations (ReLU6 for the Lite encoders) to 3 digits at half the bytes.
        return self.encoder.encode(images)[1].astype(np.float16)

    def describe(self) -> dict[str, str | int]:
        return self.encoder.describe()


def feature_shape(encoder) -> tuple[int, ...]:
    """The shape of one photo's feature from `encoder`: [D], or [H*W, C] for a `GridEncoder`."""
    shape = getattr(encoder, "feature_shape", None)
    return tuple(shape) if shape is not None else (encoder.feature_dim,)


class FeatureCache:
    """Features of one encoder, in memory (bounded LRU) and optionally on disk (one .npy each).
    With `grid_shape` (H, W) it holds spatial maps, float16 [H*W, feature_dim], in a folder of their own.

    Disk entries are written atomically; an entry that is unreadable, of the wrong shape, not
    finite or not a regular file is treated as missing (and recomputed by the caller). The cache is
    a help, never a requirement: an entry that cannot be written is only logged.
    """

    def __init__(self, encoder_identity: dict, directory: str | Path | None = None, memory_items: int = 4096,
                 grid_shape: tuple[int, int] | None = None):
        self.feature_dim = int(encoder_identity["feature_dim"])
        self.shape: tuple[int, ...] = (self.feature_dim,)
        self.dtype = np.dtype(np.float32)
        # The loader's version is part of the key: features of pixels decoded another way are not reused.
        key = (f"{encoder_identity['name']}|{encoder_identity['weights_id']}|{encoder_identity['image_size']}"
               f"|loader{LOADER_VERSION}")
        if grid_shape is not None:
            self.shape, self.dtype = (grid_shape[0] * grid_shape[1], self.feature_dim), np.dtype(np.float16)
            key += f"|grid{grid_shape[0]}x{grid_shape[1]}"
            # A map is 49x the bytes of a vector (125 KB for EfficientNet-Lite0): keep fewer in memory.
            memory_items = min(memory_items, 256)
        tag = hashlib.sha256(key.encode()).hexdigest()[:16]
        kind = "-grid" if grid_shape is not None else ""
        self.directory = Path(directory) / f"{encoder_identity['name']}{kind}-{tag}" if directory else None
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memory_items = memory_items
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        if self.directory is None:
            return None
        path = self._path(key)
        try:
            if not stat.S_ISREG(path.stat().st_mode):  # a planted FIFO would block np.load forever
                return None
            vector = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None
        if (
            not isinstance(vector, np.ndarray)  # np.load returns an archive for zip data
            or vector.shape != self.shape or vector.dtype != self.dtype or not np.isfinite(vector).all()
        ):
            return None
        self._remember(key, vector)
        return vector

    def put(self, key: str, vector: np.ndarray) -> None:
        vector = np.asarray(vector, self.dtype)
        self._remember(key, vector)
        if self.directory is not None:
            try:
                atomic_save(self._path(key), lambda p: np.save(p, vector, allow_pickle=False), suffix=".npy")
            except OSError as e:  # e.g. a directory in the entry's place, or a full disk
                log.warning("feature cache: could not write %s (%s)", self._path(key), e.strerror or e)

    def _remember(self, key: str, vector: np.ndarray) -> None:
        with self._lock:
            self._memory[key] = vector
            self._memory.move_to_end(key)
            while len(self._memory) > self._memory_items:
                self._memory.popitem(last=False)


@dataclass
class FeatureBatch:
    """Features for some of the requested images, in request order."""

    indices: list[int]          # positions in the request of the images that have a feature
    features: np.ndarray        # [len(indices), *feature shape]
    errors: list[tuple[int, ImageError]]  # positions and reasons of the images that failed


@dataclass
class _Prepared:
    """One photo made ready for the encoder: pixels to encode, a cached feature, or an error."""

    key: str | None = None
    pixels: np.ndarray | None = None
    cached: np.ndarray | None = None
    error: ImageError | None = None


def iter_features(
    sources: Sequence[ImageSource], encoder, cache: FeatureCache | None = None, batch_size: int = 32,
    max_pixels: int = MAX_PIXELS,
) -> Iterator[FeatureBatch]:
    """Encode `sources` batch by batch, in order, so callers can stream results.

    A thread pool hashes, looks up and decodes the next batch's photos (Pillow releases the GIL)
    while the encoder runs on this one. Plain threads rather than tf.data: the caption path may
    run without TensorFlow (the LiteRT runtime). A photo that cannot be read becomes an entry in
    `errors`, never an exception. A photo of more than `max_pixels` is refused from its header.
    """
    size = encoder.image_size

    def prepare(i: int) -> _Prepared:
        try:
            key = content_key(sources[i])
            cached = cache.get(key) if cache is not None else None
            if cached is not None:
                return _Prepared(key, cached=cached)
            return _Prepared(key, pixels=load_image(sources[i], size, max_pixels))
        except ImageError as e:
            return _Prepared(error=e)
        except (OSError, TypeError) as e:  # unreadable file or unknown source type met while hashing:
            return _Prepared(error=_as_image_error(sources[i], e))  # let the loader word the reason

    starts = range(0, len(sources), batch_size)
    with ThreadPoolExecutor(max_workers=_DECODE_THREADS) as pool:
        def submit(start: int) -> list[Future]:
            return [pool.submit(prepare, i) for i in range(start, min(start + batch_size, len(sources)))]

        upcoming = submit(0) if len(sources) else []
        for start in starts:
            current, upcoming = upcoming, (submit(start + batch_size) if start + batch_size < len(sources) else [])
            prepared = [f.result() for f in current]
            todo = [j for j, p in enumerate(prepared) if p.pixels is not None]
            if todo:
                encoded = encoder(np.stack([prepared[j].pixels for j in todo]))
                for j, feature in zip(todo, encoded):
                    prepared[j].cached = feature
                    if cache is not None:
                        cache.put(prepared[j].key, feature)
            ok = [j for j, p in enumerate(prepared) if p.error is None]
            yield FeatureBatch(
                indices=[start + j for j in ok],
                features=np.stack([prepared[j].cached for j in ok]) if ok else np.zeros((0, *feature_shape(encoder)),
                                                                                          np.float32),
                errors=[(start + j, p.error) for j, p in enumerate(prepared) if p.error is not None],
            )


def _as_image_error(source: ImageSource, error: Exception) -> ImageError:
    try:
        load_image(source)
    except ImageError as e:
        return e
    return ImageError(describe_source(source), str(error))


def extract_features(
    sources: Sequence[ImageSource], encoder, cache: FeatureCache | None = None, batch_size: int = 32,
    progress: bool = True, description: str = "Encoding photos", out_path: Path | None = None,
) -> tuple[np.ndarray, list[ImageError]]:
    """Features for every source ([N, *feature shape]; rows of failed photos are NaN) and the
    failures. With `out_path` they go into a memory-mapped .npy file there (grids of a whole
    dataset need not fit in memory), in the cache's dtype."""
    from tqdm.auto import tqdm

    shape, dtype = (len(sources), *feature_shape(encoder)), cache.dtype if cache is not None else np.float32
    if out_path is None:
        out = np.empty(shape, dtype)
    else:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(out_path, mode="w+", dtype=dtype, shape=shape)
    out[...] = np.nan
    failures: list[ImageError] = []
    with tqdm(total=len(sources), desc=description, unit="img", disable=not progress) as bar:
        for batch in iter_features(sources, encoder, cache, batch_size):
            out[batch.indices] = batch.features
            failures.extend(e for _, e in batch.errors)
            bar.update(len(batch.indices) + len(batch.errors))
    return out, failures


def encode_photos(
    images: Mapping[str, Path], ids: Sequence[str], encoder, cache: FeatureCache | None = None,
    progress: bool = True, description: str = "Encoding photos", out_path: Path | None = None,
) -> tuple[list[str], np.ndarray, list[ImageError]]:
    """Features of a dataset's photos `ids`: the ids that could be encoded, their features
    [N, *feature shape] in that order, and the failures (training and evaluation skip those photos).
    `out_path`: keep the features in a memory-mapped file there (see `extract_features`)."""
    features, failures = extract_features([images[i] for i in ids], encoder, cache, progress=progress,
                                          description=description, out_path=out_path)
    # A failed photo's row is all NaN, a cached feature all finite: one value per row tells them apart.
    ok = ~np.isnan(features.reshape(len(features), -1)[:, 0]) if len(features) else np.zeros(0, bool)
    keep = np.flatnonzero(ok)
    for row, i in enumerate(keep):  # compact in place: no copy of a memory-mapped array
        if row != i:
            features[row] = features[i]
    return [ids[i] for i in keep], features[: len(keep)], failures
