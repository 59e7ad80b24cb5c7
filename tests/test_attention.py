"""Show, Attend and Tell: grid features, the attention decoder, its bundles, decoding with
per-word attention, and what a tiny one learns on the generated shapes."""
from dataclasses import replace

import numpy as np
import pytest
from helpers import edit_config

from captioner.bundle import Bundle, BundleError, load_bundle
from captioner.captioner import Captioner
from captioner.decoding import DecodeOptions, decode
from captioner.encoder import GridEncoder
from captioner.evaluation import evaluate
from captioner.export_litert import add_litert_files
from captioner.features import FeatureCache, encode_photos
from captioner.model import ShowAttendTell
from captioner.runtime_tf import TensorFlowStep
from captioner.synthetic import COLOURS, SHAPES, Scene, Shape, render_scene
from captioner.text import Vocabulary

TINY = {"name": "tiny", "weights_id": "random:seed=0", "image_size": 64, "feature_dim": 64}


def test_one_pass_gives_the_grid_and_the_same_pooled_features(tiny_encoder):
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3)).astype(np.uint8)
    pooled, grid = tiny_encoder.encode(images)
    assert tiny_encoder.grid_shape == (8, 8) and grid.shape == (3, 64, 64)
    np.testing.assert_array_equal(pooled, tiny_encoder(images))  # existing caches and bundles stay valid
    np.testing.assert_allclose(grid.mean(axis=1), pooled, atol=1e-6)


def test_grids_are_cached_as_float16_apart_from_pooled_features(tmp_path, tiny_encoder, shapes):
    grids = GridEncoder(tiny_encoder)
    cache = FeatureCache(tiny_encoder.describe(), tmp_path / "cache", grid_shape=grids.grid_shape)
    assert cache.directory != FeatureCache(tiny_encoder.describe(), tmp_path / "cache").directory
    ids = shapes.splits["train"][:6]
    kept, features, failures = encode_photos(shapes.images, ids, grids, cache, progress=False,
                                             out_path=tmp_path / "grids.npy")
    assert kept == ids and not failures
    assert isinstance(features, np.memmap) and features.dtype == np.float16 and features.shape == (6, 64, 64)
    files = sorted(cache.directory.rglob("*.npy"))
    assert len(files) == 6 and all(np.load(f).dtype == np.float16 for f in files)
    # A second pass reads the cache (an encoder that would fail proves it is not called).
    _, again, _ = encode_photos(shapes.images, ids, _Refusing(grids), cache, progress=False)
    np.testing.assert_array_equal(again, features)


class _Refusing:
    def __init__(self, grids):
        self.image_size, self.feature_shape, self.describe = grids.image_size, grids.feature_shape, grids.describe

    def __call__(self, images):
        raise AssertionError("encoded a cached photo")


def _model(vocab_size: int, regions: int = 64, feature_dim: int = 64) -> ShowAttendTell:
    return ShowAttendTell(vocab_size, feature_dim, regions, embed_dim=12, units=16, attention_dim=10, dropout=0.2)


def _vocab() -> Vocabulary:
    return Vocabulary.build(["a red circle on a white background", "a blue square and a green triangle"], 1)


def test_bundle_round_trip_and_checks(tmp_path):
    vocab = _vocab()
    model = _model(len(vocab))
    Bundle(model, vocab, TINY).save(tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    assert loaded.model_type == "show-attend-tell" and isinstance(loaded.model, ShowAttendTell)
    grids = np.random.default_rng(0).random((2, 64, 64)).astype(np.float32)
    tokens = np.array([[1, 5, 6, 7], [1, 8, 0, 0]], np.int32)
    np.testing.assert_allclose(loaded.model((grids, tokens)), model((grids, tokens)), atol=1e-5)

    # Loaded on "auto", it runs on TensorFlow; LiteRT is refused with the reason.
    assert Captioner.load(tmp_path / "b").runtime == "tf"
    with pytest.raises(BundleError, match="show-attend-tell models run on TensorFlow only"):
        Captioner.load(tmp_path / "b", runtime="litert")
    with pytest.raises(BundleError, match="no LiteRT export yet"):
        add_litert_files(tmp_path / "b", "default")

    sizes = loaded.decoder_sizes
    for key, value in [("regions", 10**6), ("attention_dim", 0), ("attention_lambda", -1)]:
        edit_config(tmp_path / "b", decoder={**sizes, key: value})
        with pytest.raises(BundleError, match=key):
            load_bundle(tmp_path / "b")


def test_a_captioner_refuses_an_encoder_with_another_grid(tmp_path, tiny_encoder):
    vocab = _vocab()
    Bundle(_model(len(vocab), regions=49), vocab, TINY).save(tmp_path / "b")
    with pytest.raises(BundleError, match="attends over 49 regions but encoder tiny gives 8x8"):
        Captioner(load_bundle(tmp_path / "b"), tiny_encoder)


@pytest.mark.parametrize("options", [DecodeOptions("greedy", max_len=6), DecodeOptions("beam", 3, 6, num_results=3),
                                     DecodeOptions("sample", max_len=6, seed=1)])
def test_decoding_gives_each_word_its_attention(options):
    vocab = _vocab()
    model = _model(len(vocab), regions=16, feature_dim=8)
    bias = model.head.bias.numpy()
    bias[Vocabulary.end_id] = -3.0  # an untrained model would often end at once: make it say words
    model.head.bias.assign(bias)
    step = TensorFlowStep(model)
    grids = np.random.default_rng(1).random((5, 16, 8)).astype(np.float32)
    together = decode(step, grids, options)
    for hyps in together:
        for h in hyps:
            assert h.attention.shape == (len(h.ids), 16)
            np.testing.assert_allclose(h.attention.sum(axis=1), 1.0, atol=1e-5)
    # The weights are the ones behind each word: replay the best caption one forced step at a time.
    best = together[0][0]
    assert best.ids
    states = step.initial_state(grids[:1])
    for t, token in enumerate([Vocabulary.start_id, *best.ids][: len(best.ids)]):
        _, states = step.step(np.array([token], np.int32), states)
        np.testing.assert_allclose(states[step.attention_state][0], best.attention[t], atol=1e-5)
    if options.method != "sample":  # batching changes nothing (sampling draws per batch)
        for i in range(len(grids)):
            alone = decode(step, grids[i : i + 1], options)[0]
            assert [h.ids for h in alone] == [h.ids for h in together[i]]
            for a, b in zip(alone, together[i]):
                np.testing.assert_allclose(a.attention, b.attention, atol=1e-5)


# ---------------------------------------------------------------------------
# A tiny attention model trained on the shapes (the slower tests; `attend_run` is in conftest.py)
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_attention_model_learns_the_shapes(shapes, attend_run, tiny_encoder):
    run_dir, bundle = attend_run
    assert bundle.model_type == "show-attend-tell" and not bundle.litert
    assert not list(run_dir.glob("grids-*.npy"))  # the run's grid files are removed at the end
    untrained = ShowAttendTell.from_config(bundle.model.get_config())
    scores = {}
    for name, model in [("trained", bundle.model), ("untrained", untrained)]:
        captioner = Captioner(replace(bundle, model=model), tiny_encoder)
        for method in ("greedy", "beam"):
            report = evaluate(captioner, shapes, "test", replace(captioner.options, method=method, beam_size=3),
                              coco=False, progress=False)
            scores[name, method] = report["scores"]["BLEU-4"]
    assert scores["trained", "greedy"] > 30 and scores["trained", "beam"] > 30, scores
    assert scores["untrained", "greedy"] < 5 and scores["untrained", "beam"] < 5, scores

    photos = [shapes.images[i] for i in shapes.splits["test"][:4]]
    results = Captioner(bundle, tiny_encoder).caption(photos, beam_size=3, num_results=2)
    again = Captioner.load(run_dir / "model", cache_dir=None).caption(photos, beam_size=3, num_results=2)
    for r, s in zip(results, again):
        assert r.caption == s.caption
        for beam in r.beams:
            assert beam.attention.shape == (len(beam.caption.split()), 8, 8)
        np.testing.assert_allclose(r.attention, s.attention, atol=1e-5)


CORNERS = {(0, 0): (0.25, 0.25), (0, 1): (0.75, 0.25), (1, 0): (0.25, 0.75), (1, 1): (0.75, 0.75)}


@pytest.mark.slow
def test_the_word_naming_a_shape_attends_to_its_corner(attend_run, tiny_encoder):
    """One shape in a known corner: at the word naming its colour, more attention lies on that
    corner's quarter of the 8x8 map than on any other quarter."""
    captioner = Captioner(attend_run[1], tiny_encoder)
    scenes = [(corner, Scene((Shape(SHAPES[i % 3], colour, cx, cy, 0.4),), "gray"))
              for corner, (cx, cy) in CORNERS.items() for i, colour in enumerate(COLOURS)]
    results = captioner.caption([np.asarray(render_scene(s, 64)) for _, s in scenes], method="greedy")
    on_corner, elsewhere = [], []
    for (corner, scene), result in zip(scenes, results):
        words = result.caption.split()
        colour = scene.shapes[0].colour
        if colour not in words:
            continue
        quarters = result.attention[words.index(colour)].reshape(2, 4, 2, 4).sum(axis=(1, 3))  # [2, 2]
        on_corner.append(quarters[corner])
        elsewhere.append((quarters.sum() - quarters[corner]) / 3)
    assert len(on_corner) >= len(scenes) // 2, "the model named too few colours to judge"
    # Uniform attention would give each quarter 0.25.
    assert np.mean(on_corner) > 1.5 * np.mean(elsewhere), (np.mean(on_corner), np.mean(elsewhere))
