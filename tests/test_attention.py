"""Show, Attend and Tell: grid features, the attention decoder, its bundles, decoding with
per-word attention, and what a tiny one learns on the generated shapes."""
import shutil
from dataclasses import replace

import numpy as np
import pytest
from helpers import caption_on_litert_in_a_new_process, edit_config

from captioner.bundle import Bundle, BundleError, load_bundle
from captioner.captioner import Captioner
from captioner.decoding import DecodeOptions, decode
from captioner.evaluation import evaluate
from captioner.export_litert import add_litert_files
from captioner.features import FeatureCache, GridEncoder, encode_photos
from captioner.images import load_image
from captioner.model import ShowAttendTell
from captioner.quiet_tensorflow import keras
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

    # Without its LiteRT files, "auto" runs it on TensorFlow and "litert" says why it cannot.
    assert Captioner.load(tmp_path / "b").runtime == "tf"
    with pytest.raises(BundleError, match="cannot run on LiteRT: the bundle has no LiteRT files"):
        Captioner.load(tmp_path / "b", runtime="litert")

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
    states, context = step.initial_state(grids[:1])
    for t, token in enumerate([Vocabulary.start_id, *best.ids][: len(best.ids)]):
        _, states = step.step(np.array([token], np.int32), states, context, np.array([0]))
        np.testing.assert_allclose(states[step.attention_state][0], best.attention[t], atol=1e-5)
    if options.method != "sample":  # batching changes nothing (sampling draws per batch)
        for i in range(len(grids)):
            alone = decode(step, grids[i : i + 1], options)[0]
            assert [h.ids for h in alone] == [h.ids for h in together[i]]
            for a, b in zip(alone, together[i]):
                np.testing.assert_allclose(a.attention, b.attention, atol=1e-5)


def test_steps_in_runs_of_beams_equal_the_teacher_forced_call():
    """Three rows per image, each reading its image's context by index, give the logits the
    training-time RNN gives each image alone (the images in the context in another order)."""
    vocab = _vocab()
    model = _model(len(vocab), regions=16, feature_dim=8)
    grids = np.random.default_rng(2).random((4, 16, 8)).astype(np.float32)
    tokens = np.array([[1, 5, 6, 7], [1, 8, 4, 9], [1, 6, 6, 5], [1, 7, 8, 4]], np.int32)
    full = np.asarray(model((grids, tokens)))
    order = np.array([2, 0, 3, 1])  # row run i reads image order[i] of the context
    states = [np.repeat(np.asarray(s)[order], 3, axis=0) for s in model.initial_state(grids)]
    context = model.image_context(grids)
    for t in range(tokens.shape[1]):
        logits, states = model.step(np.repeat(tokens[order, t], 3), states, context, order)
        np.testing.assert_allclose(np.asarray(logits), np.repeat(full[order, t], 3, axis=0), atol=1e-5)


class _CarriedStep:
    """Decoding as it was before image contexts: the regions and their keys ride in every beam's
    states (reordered with the beams), through the cell the training-time RNN runs."""

    attention_state = 4

    def __init__(self, model: ShowAttendTell):
        self.model = model

    def initial_state(self, grids):
        (h, c, alpha), (keys, regions) = self.model.initial_state(grids), self.model.image_context(grids)
        flat = [np.asarray(x).reshape(len(grids), -1) for x in (keys, regions)]
        return [np.asarray(h), np.asarray(c), *flat, np.asarray(alpha)], None

    def step(self, tokens, states, context, images):
        x = self.model.embedding(tokens)
        outputs, cell_states = self.model.cell(x, list(states[:4]))
        h, read, alpha = np.split(np.asarray(outputs), [self.model.units, self.model.units + self.model.feature_dim], 1)
        logits = np.asarray(self.model.word_logits(x, h, read), np.float64)
        logits[:, [Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.unk_id]] = -np.inf
        log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
        return log_probs - logits.max(1, keepdims=True), [*map(np.asarray, cell_states), alpha]


@pytest.mark.parametrize("options", [DecodeOptions("greedy", max_len=8), DecodeOptions("beam", 4, 8, num_results=4),
                                     DecodeOptions("sample", max_len=8, seed=3)])
def test_context_by_index_decodes_as_carrying_the_regions_in_every_beam(options):
    vocab = _vocab()
    model = _model(len(vocab), regions=16, feature_dim=8)
    bias = model.head.bias.numpy()
    bias[Vocabulary.end_id] = -2.0
    model.head.bias.assign(bias)
    grids = np.random.default_rng(4).random((6, 16, 8)).astype(np.float32)
    new, old = decode(TensorFlowStep(model), grids, options), decode(_CarriedStep(model), grids, options)
    assert sum(len(h.ids) for hyps in new for h in hyps) > 6  # they say words, not just <end>
    for a, b in zip(new, old):
        assert [h.ids for h in a] == [h.ids for h in b]
        np.testing.assert_allclose([h.log_prob for h in a], [h.log_prob for h in b], atol=1e-4)
        for x, y in zip(a, b):
            np.testing.assert_allclose(x.attention, y.attention, atol=1e-5)


# ---------------------------------------------------------------------------
# The LiteRT runtime
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litert_bundle(tmp_path_factory, tiny_encoder, shapes):
    """An untrained tiny attention bundle (weights spread wider, so captions vary) with its LiteRT
    files, an int8 encoder among them, calibrated on a few training photos."""
    vocab = _vocab()
    keras.utils.set_random_seed(5)
    model = _model(len(vocab))
    rng = np.random.default_rng(5)
    model.set_weights([w + rng.normal(0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
    bias = model.head.bias.numpy()
    bias[Vocabulary.end_id] = -3.0  # an untrained model would often end at once: make it say words
    model.head.bias.assign(bias)
    directory = tmp_path_factory.mktemp("attend-litert") / "b"
    Bundle(model, vocab, tiny_encoder.describe()).save(directory)
    calibration = np.stack([load_image(shapes.images[i], 64) for i in shapes.splits["train"][:8]])
    hashes = add_litert_files(directory, tiny_encoder, calibration)
    assert sorted(hashes) == ["decoder.tflite", "encoder.int8.tflite", "encoder.tflite"]
    return directory


@pytest.mark.parametrize("options", [DecodeOptions("greedy", max_len=8), DecodeOptions("beam", 3, 8, num_results=3),
                                     DecodeOptions("sample", max_len=8, seed=2)])
def test_litert_captions_and_attention_match_tensorflows(litert_bundle, shapes, options):
    tf_run, lite_run = Captioner.load(litert_bundle, runtime="tf"), Captioner.load(litert_bundle, runtime="litert-float")
    assert lite_run.runtime == "litert" and Captioner.load(litert_bundle).runtime == "litert"
    assert lite_run.grid_shape == tf_run.grid_shape == (8, 8)
    photos = [shapes.images[i] for i in shapes.splits["dev"][:9]]
    expected = tf_run.caption(photos, options)
    assert all(len(r.caption.split()) > 2 for r in expected), [r.caption for r in expected]
    # Any batch size (sampling draws per batch: the same batches as TensorFlow's only).
    for batch_size in (1, 4, 32) if options.method != "sample" else (32,):
        for a, b in zip(expected, lite_run.caption(photos, options, batch_size=batch_size)):
            assert [x.caption for x in a.beams] == [x.caption for x in b.beams]
            np.testing.assert_allclose([x.log_prob for x in a.beams], [x.log_prob for x in b.beams], atol=1e-3)
            for x, y in zip(a.beams, b.beams):
                np.testing.assert_allclose(x.attention, y.attention, atol=1e-4)


def test_litert_grid_features_match_tensorflows_and_int8_is_calibrated(litert_bundle, shapes, tiny_encoder):
    photos = np.stack([load_image(shapes.images[i], 64) for i in shapes.splits["dev"][:5]])
    pooled, grids = tiny_encoder.encode(photos)
    exact = Captioner.load(litert_bundle, runtime="litert-float").encoder
    got_pooled, got_grids = exact.encode(photos)
    np.testing.assert_allclose(got_grids, grids, atol=1e-4)
    np.testing.assert_allclose(got_pooled, pooled, atol=1e-4)
    fast = Captioner.load(litert_bundle, runtime="litert").encoder
    assert fast.int8 and not exact.int8
    quantised = fast.encode(photos)[1]
    assert quantised.shape == grids.shape and not np.array_equal(quantised, grids)
    assert np.corrcoef(quantised.ravel(), grids.ravel())[0, 1] > 0.9


def test_litert_attention_files_are_checked_against_the_config(litert_bundle, tmp_path):
    copy = shutil.copytree(litert_bundle, tmp_path / "b")
    sizes = load_bundle(copy, load_decoder=False).decoder_sizes
    edit_config(copy, decoder={**sizes, "attention_dim": 11})
    with pytest.raises(BundleError, match=r"decoder.tflite: signature 'init' has keys \[-1, 64, 10\], "
                                          r"the bundle's config needs \[-1, 64, 11\]"):
        Captioner.load(copy, runtime="litert")
    edit_config(copy, decoder=sizes, encoder={**load_bundle(copy, load_decoder=False).encoder, "feature_dim": 32})
    with pytest.raises(BundleError):  # the config's own checks: decoder and encoder disagree
        Captioner.load(copy, runtime="litert")


def test_the_attention_caption_path_imports_neither_tensorflow_nor_keras(litert_bundle, shapes):
    photo = shapes.images[shapes.splits["dev"][0]]
    (caption, shape), heavy, stderr = caption_on_litert_in_a_new_process(litert_bundle, photo,
                                                                          "result.caption, result.attention.shape")
    assert caption and shape == f"({len(caption.split())}, 8, 8)" and heavy == []
    assert stderr == "", stderr


# ---------------------------------------------------------------------------
# A tiny attention model trained on the shapes (the slower tests; `attend_run` is in conftest.py)
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_attention_model_learns_the_shapes(shapes, attend_run, tiny_encoder):
    run_dir, bundle = attend_run
    assert bundle.model_type == "show-attend-tell" and sorted(bundle.litert) == ["decoder.tflite", "encoder.tflite"]
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
    loaded = Captioner.load(run_dir / "model", cache_dir=None)
    assert loaded.runtime == "litert"  # training wrote its LiteRT files: the trained model's captions, there
    again = loaded.caption(photos, beam_size=3, num_results=2)
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
