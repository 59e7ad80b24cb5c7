"""Unit tests of captioner/features.py: content keys, the feature cache, batched extraction."""
import io

import numpy as np
import pytest
from helpers import IDENTITY, CountingEncoder
from PIL import Image

from captioner.features import (
    FeatureCache,
    content_key,
    extract_features,
    iter_features,
)


def write_photos(folder, colours):
    paths = []
    for i, colour in enumerate(colours):
        path = folder / f"p{i}.png"
        Image.new("RGB", (8, 8), colour).save(path)
        paths.append(str(path))
    return paths


def test_content_key_is_the_bytes_not_the_name(tmp_path):
    a, b = write_photos(tmp_path, [(1, 2, 3), (1, 2, 4)])
    (tmp_path / "renamed.png").write_bytes((tmp_path / "p0.png").read_bytes())
    assert content_key(a) == content_key(tmp_path / "renamed.png") != content_key(b)
    assert content_key((tmp_path / "p0.png").read_bytes()) == content_key(a)  # an upload of the file
    pixels = np.zeros((2, 2, 3), np.uint8)
    assert content_key(pixels) == content_key(pixels.copy()) != content_key(pixels.astype(np.float32))
    assert content_key(Image.fromarray(pixels)) == content_key(Image.fromarray(pixels.copy()))
    assert len(content_key(a)) == 40


def test_content_key_refuses_what_is_not_a_regular_file(tmp_path):
    with pytest.raises(OSError):
        content_key(tmp_path)
    with pytest.raises(FileNotFoundError):
        content_key(tmp_path / "gone.png")


def test_cache_round_trip_on_disk(tmp_path):
    vector = np.array([1.5, -2.0, 0.25], np.float32)
    FeatureCache(IDENTITY, tmp_path).put("ab" * 20, vector)
    fresh = FeatureCache(IDENTITY, tmp_path)  # a later run: nothing in memory
    np.testing.assert_array_equal(fresh.get("ab" * 20), vector)
    assert fresh.get("cd" * 20) is None
    [entry] = list(tmp_path.rglob("*.npy"))
    assert entry.name == "ab" * 20 + ".npy" and entry.parent.name == "ab"


def test_encoders_never_share_entries(tmp_path):
    FeatureCache(IDENTITY, tmp_path).put("ab" * 20, np.ones(3, np.float32))
    for change in ({"weights_id": "other"}, {"name": "other"}, {"image_size": 16}):
        assert FeatureCache({**IDENTITY, **change}, tmp_path).get("ab" * 20) is None


def test_memory_cache_is_bounded_lru():
    cache = FeatureCache(IDENTITY, None, memory_items=2)
    for key in "abc":
        cache.put(key, np.full(3, ord(key), np.float32))
    assert cache.get("a") is None and cache.get("c") is not None
    cache.get("b")  # used: now "c" is the oldest
    cache.put("d", np.zeros(3, np.float32))
    assert cache.get("c") is None and cache.get("b") is not None


def test_iter_features_streams_in_order_with_errors(tmp_path):
    paths = write_photos(tmp_path, [(10, 0, 0), (0, 20, 0), (0, 0, 30)])
    (tmp_path / "bad.jpg").write_text("not a photo")
    sources = [paths[0], str(tmp_path / "bad.jpg"), paths[1], np.full((5, 5, 3), 7, np.uint8), paths[2]]
    batches = list(iter_features(sources, CountingEncoder(), None, batch_size=2))
    assert [b.indices for b in batches] == [[0], [2, 3], [4]]
    assert [[i for i, _ in b.errors] for b in batches] == [[1], [], []]
    assert "not an image" in batches[0].errors[0][1].reason
    np.testing.assert_allclose(np.concatenate([b.features for b in batches]),
                               [[10, 0, 0], [0, 20, 0], [7, 7, 7], [0, 0, 30]])


def test_a_second_run_encodes_nothing(tmp_path):
    paths = write_photos(tmp_path, [(i, i, i) for i in range(5)])
    encoder = CountingEncoder()
    first, failures = extract_features(paths, encoder, FeatureCache(IDENTITY, tmp_path / "c"), progress=False)
    assert encoder.encoded == 5 and not failures
    again, _ = extract_features(paths, encoder, FeatureCache(IDENTITY, tmp_path / "c"), progress=False)
    assert encoder.encoded == 5
    np.testing.assert_array_equal(first, again)


def test_extract_features_marks_failures_with_nan(tmp_path):
    [good] = write_photos(tmp_path, [(3, 3, 3)])
    features, failures = extract_features([good, str(tmp_path / "missing.png")], CountingEncoder(), None,
                                          progress=False)
    assert np.isfinite(features[0]).all() and np.isnan(features[1]).all()
    assert [f.source for f in failures] == [str(tmp_path / "missing.png")]


def test_in_memory_sources_are_cached_by_pixels():
    encoder = CountingEncoder()
    cache = FeatureCache(IDENTITY)
    photo = np.full((8, 8, 3), 9, np.uint8)
    list(iter_features([photo, Image.fromarray(photo)], encoder, cache))
    list(iter_features([photo.copy(), Image.fromarray(photo.copy())], encoder, cache))
    assert encoder.encoded == 2


def test_an_unsupported_source_fails_alone(tmp_path):
    # only paths, bytes, PIL images and arrays are sources: anything else (here an upload's file object)
    # is that item's error, not the end of the whole batch
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    [good] = write_photos(tmp_path, [(1, 1, 1)])
    [batch] = list(iter_features([buffer, good, 42], CountingEncoder(), None))
    assert batch.indices == [1]
    assert [(i, e.source, e.reason.split(" (")[0]) for i, e in batch.errors] == [
        (0, "<BytesIO>", "unsupported source type BytesIO"), (2, "<int>", "unsupported source type int")]
