"""The synthetic shapes dataset: deterministic, well split, loadable, and captioned by what is visible."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.data import load_dataset
from captioner.synthetic import (
    BACKGROUNDS,
    COLOURS,
    JSON_NAME,
    NOUNS,
    WORDS,
    Scene,
    Shape,
    make_shapes_dataset,
    random_scene,
    render_scene,
    scene_captions,
)
from captioner.text import Vocabulary, tokenize

NOUN_KIND = {noun: kind for kind, nouns in NOUNS.items() for noun in nouns}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", n_images=12, image_size=32, seed=3)
    b = make_shapes_dataset(tmp_path / "b", n_images=12, image_size=32, seed=3)
    c = make_shapes_dataset(tmp_path / "c", n_images=12, image_size=32, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 13
    assert sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) == files
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / JSON_NAME).read_bytes() != (c / JSON_NAME).read_bytes()


def test_loads_with_requested_splits_sizes_and_vocabulary(tmp_path):
    root = make_shapes_dataset(tmp_path, n_images=40, image_size=24, seed=0, splits=(0.7, 0.2, 0.1))
    ds = load_dataset(root)
    assert ds.layout == "karpathy" and len(ds) == 40 and not ds.problems
    assert {s: len(ids) for s, ids in ds.splits.items()} == {"train": 28, "dev": 8, "test": 4}
    assert sorted(sum(ds.splits.values(), [])) == sorted(ds.images)  # disjoint and complete
    assert all(3 <= len(c) <= 5 and len(set(c)) == len(c) for c in ds.captions.values())
    all_captions = [c for cs in ds.captions.values() for c in cs]
    assert {w for c in all_captions for w in tokenize(c)} <= WORDS
    assert 15 <= len(WORDS) <= 30
    assert len(Vocabulary.build(all_captions, min_count=1)) <= len(WORDS) + 4
    for path in list(ds.images.values())[:5]:
        with Image.open(path) as im:
            assert im.size == (24, 24) and im.mode == "RGB"


def test_render_draws_the_scene(tmp_path):
    scene = Scene((Shape("square", "red", 0.3, 0.5, 0.3), Shape("circle", "blue", 0.75, 0.5, 0.3)), "gray")
    pixels = np.asarray(render_scene(scene, 40))
    assert pixels.shape == (40, 40, 3)
    assert tuple(pixels[1, 1]) == BACKGROUNDS["gray"]
    assert tuple(pixels[20, 12]) == COLOURS["red"]
    assert tuple(pixels[20, 30]) == COLOURS["blue"]
    with pytest.raises(ValueError, match="unknown shape"):
        render_scene(Scene((Shape("star", "red", 0.5, 0.5, 0.3),), "white"), 16)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_captions_name_exactly_the_visible_colours_shapes_and_background(seed):
    rng = np.random.default_rng(seed)
    scene = random_scene(rng)
    assert 1 <= len(scene.shapes) <= 2 and len({s.colour for s in scene.shapes}) == len(scene.shapes)
    for s in scene.shapes:  # inside the picture
        assert s.size / 2 <= s.cx <= 1 - s.size / 2 and s.size / 2 <= s.cy <= 1 - s.size / 2
    shown = sorted((s.colour, s.kind) for s in scene.shapes)
    for caption in scene_captions(scene, rng):
        words = tokenize(caption)
        said = sorted((w, NOUN_KIND[n]) for w, n in zip(words, words[1:]) if w in COLOURS)
        assert said == shown, caption
        assert {w for w in words if w in BACKGROUNDS} <= {scene.background}
        if "two" in words:
            assert len(scene.shapes) == 2, caption
        if {"one", "single"} & set(words):
            assert len(scene.shapes) == 1, caption


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="summing to 1"):
        make_shapes_dataset(tmp_path, n_images=5, splits=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="n_images"):
        make_shapes_dataset(tmp_path, n_images=0)
