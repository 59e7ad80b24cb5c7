"""Sharded features: the files `captioner beam extract-features` writes, and their readers.

A run writes `PREFIX-features-SSSSS-of-NNNNN.tfrecord` (one `tf.train.Example` per photo: its
dataset id, its content key and its feature vector) and `PREFIX-manifest.json` (the encoder's
identity, the count, the shard names). TFRecord because `tf.data` streams it from local disk or a
cloud store with parallel reads and checksums every record, and Beam writes it natively.

Nothing here needs Apache Beam; paths go through `tf.io.gfile`, so `gs://...` works too.
"""
from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator

import numpy as np

from captioner.data import CaptionDataset
from captioner.features import FeatureCache
from captioner.quiet_tensorflow import tf

FORMAT = "captioner-features"
VERSION = 1


class ShardError(ValueError):
    """Sharded features that cannot be used; the message names the file and why."""


def manifest_path(prefix: str) -> str:
    return f"{prefix}-manifest.json"


def encode_record(image_id: str, key: str, vector: np.ndarray) -> bytes:
    """One photo's record: its dataset id, content key (as `FeatureCache` keys it) and feature."""
    feature = {
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_id.encode("utf-8")])),
        "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode("ascii")])),
        "feature": tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(vector, np.float32))),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def read_manifest(prefix: str) -> dict:
    """The manifest of the features at `prefix`, checked for format and completeness."""
    path = manifest_path(prefix)
    try:
        with tf.io.gfile.GFile(path, "r") as f:
            manifest = json.load(f)
    except tf.errors.NotFoundError:
        raise ShardError(f"{path}: no such file; run `captioner beam extract-features --output {prefix}`") from None
    except (ValueError, tf.errors.OpError) as e:
        raise ShardError(f"{path}: not a readable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShardError(f"{path}: not a {FORMAT} v{VERSION} manifest")
    for field in ("encoder", "count", "shards"):
        if field not in manifest:
            raise ShardError(f"{path}: the manifest has no {field!r}")
    return manifest


def shard_paths(prefix: str, manifest: dict) -> list[str]:
    """The shards' full paths (the manifest names them relative to the prefix's folder)."""
    join, dirname = (posixpath.join, posixpath.dirname) if "://" in prefix else (os.path.join, os.path.dirname)
    paths = [join(dirname(prefix), name) for name in manifest["shards"]]
    missing = [p for p in paths if not tf.io.gfile.exists(p)]
    if missing:
        raise ShardError(f"{missing[0]}: shard named in {manifest_path(prefix)} is missing")
    return paths


def check_encoder(prefix: str, manifest: dict, encoder_identity: dict | None) -> None:
    """Refuse features of another encoder (a decoder fed them would caption nonsense)."""
    if encoder_identity is not None and manifest["encoder"] != encoder_identity:
        raise ShardError(f"{manifest_path(prefix)}: features of encoder {manifest['encoder'].get('name')} "
                         f"({str(manifest['encoder'].get('weights_id'))[:20]}), not of "
                         f"{encoder_identity['name']} ({encoder_identity['weights_id'][:20]})")


def _spec(manifest: dict, fields: tuple[str, ...]) -> dict:
    """The parsing spec of the named fields of a record."""
    spec = {"id": tf.io.FixedLenFeature([], tf.string), "key": tf.io.FixedLenFeature([], tf.string),
            "feature": tf.io.FixedLenFeature([int(manifest["encoder"]["feature_dim"])], tf.float32)}
    return {field: spec[field] for field in fields}


def feature_dataset(prefix: str, encoder_identity: dict | None = None, shuffle_seed: int | None = None
                    ) -> tf.data.Dataset:
    """Stream (id, key, feature) from the shards with `tf.data`; nothing is loaded whole.

    With `encoder_identity`, features of another encoder are refused. With `shuffle_seed`, the
    shards are read in a new order every epoch (records within a shard keep theirs).
    """
    manifest = read_manifest(prefix)
    check_encoder(prefix, manifest, encoder_identity)
    spec = _spec(manifest, ("id", "key", "feature"))

    def parse(record):
        example = tf.io.parse_single_example(record, spec)
        return example["id"], example["key"], example["feature"]

    paths = shard_paths(prefix, manifest)
    files = tf.data.Dataset.from_tensor_slices(tf.constant(paths, tf.string))
    if shuffle_seed is not None:
        files = files.shuffle(max(len(paths), 1), seed=shuffle_seed, reshuffle_each_iteration=True)
    # Several shards read at once, their records interleaved one by one (deterministically).
    return (files.interleave(tf.data.TFRecordDataset, cycle_length=max(min(len(paths), 8), 1),
                             num_parallel_calls=tf.data.AUTOTUNE)
            .map(parse, num_parallel_calls=tf.data.AUTOTUNE))


def read_split(prefix: str, encoder_identity: dict, dataset: CaptionDataset, split: str,
               with_features: bool = True) -> tuple[list[str], np.ndarray | None]:
    """The photos of `dataset`'s `split` that have a record in the shards, in the split's order,
    and (`with_features`) their features [n, D]; only that split's features are kept in memory.

    One pass over the shards, a shard at a time, which checks them against the dataset: a record
    of a photo the dataset does not have, a photo recorded twice, a feature that is not finite or a
    count that is not the manifest's is refused, naming the shard (or manifest) and the field.
    """
    manifest = read_manifest(prefix)
    check_encoder(prefix, manifest, encoder_identity)
    spec = _spec(manifest, ("id", "feature") if with_features else ("id",))
    wanted = set(dataset.splits.get(split, []))
    seen: set[str] = set()
    found: dict[str, np.ndarray | None] = {}
    for path in shard_paths(prefix, manifest):
        records = tf.data.TFRecordDataset(path).batch(1024).map(lambda r: tf.io.parse_example(r, spec))
        try:
            for batch in records.as_numpy_iterator():
                for n, raw in enumerate(batch["id"]):
                    image_id = raw.decode("utf-8", "replace")
                    if image_id not in dataset.captions:
                        raise ShardError(f"{path}: field 'id': photo {image_id!r} is not in the dataset "
                                         f"{dataset.name or dataset.root} (features of another dataset?)")
                    if image_id in seen:
                        raise ShardError(f"{path}: field 'id': photo {image_id!r} has a second record")
                    seen.add(image_id)
                    if image_id in wanted:
                        vector = batch["feature"][n] if with_features else None
                        if vector is not None and not np.isfinite(vector).all():
                            raise ShardError(f"{path}: field 'feature' of photo {image_id!r} is not finite")
                        found[image_id] = vector
        except tf.errors.OpError as e:
            raise ShardError(f"{path}: unreadable shard ({e.message.splitlines()[0]})") from None
    if len(seen) != manifest["count"]:
        raise ShardError(f"{manifest_path(prefix)}: field 'count' is {manifest['count']}, "
                         f"the shards hold {len(seen)} records")
    ids = [i for i in dataset.splits.get(split, []) if i in found]
    features = np.stack([found[i] for i in ids]) if with_features and ids else None
    return ids, features


def iter_features(prefix: str, encoder_identity: dict | None = None, batch_size: int = 1024
                  ) -> Iterator[tuple[list[str], list[str], np.ndarray]]:
    """(ids, keys, features [n, D]) a batch of records at a time."""
    for ids, keys, features in feature_dataset(prefix, encoder_identity).batch(batch_size).as_numpy_iterator():
        yield [i.decode("utf-8") for i in ids], [k.decode("ascii") for k in keys], features


def import_into_cache(prefix: str, cache: FeatureCache, encoder_identity: dict) -> int:
    """Put every feature of the shards into `cache` (keyed by photo content, as the encoder would),
    so `captioner train` and `evaluate` with that cache encode nothing. Returns the count."""
    count = 0
    for _, keys, features in iter_features(prefix, encoder_identity):
        for key, vector in zip(keys, features):
            if not np.isfinite(vector).all():
                raise ShardError(f"{prefix}: a feature of photo {key} is not finite")
            cache.put(key, vector)
        count += len(keys)
    return count
