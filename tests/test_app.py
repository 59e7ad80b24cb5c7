"""The Streamlit page, driven headlessly with `streamlit.testing.v1.AppTest` on the tiny trained model."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from captioner import attention_maps
from captioner.captioner import Captioner
from captioner.encoder import ImageEncoder
from captioner.runtime_litert import LiteRTEncoder
from captioner.images import load_image
from captioner.synthetic import random_scene, render_photo

APP = Path(__file__).resolve().parents[1] / "app.py"
pytestmark = pytest.mark.slow  # trains the tiny model (shared session fixture)


@pytest.fixture(scope="module")
def app():
    """app.py as a module, for its helpers (its page runs only under `streamlit run`)."""
    spec = importlib.util.spec_from_file_location("captioner_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bundle_dir(trained_run, monkeypatch):
    """The tiny bundle, made the page's default model through `$CAPTIONER_MODEL`."""
    model = trained_run[0] / "model"
    monkeypatch.setenv("CAPTIONER_MODEL", str(model))
    return model


@pytest.fixture(scope="module")
def page_captioner(trained_run):
    """The tiny model as the page loads it (the same runtime: LiteRT when the bundle has its files)."""
    return Captioner.load(trained_run[0] / "model")


@pytest.fixture
def encoder_calls(monkeypatch) -> list[int]:
    """Sizes of the image batches any encoder (TensorFlow or LiteRT) in this process encodes from now on."""
    calls: list[int] = []
    for cls in (ImageEncoder, LiteRTEncoder):
        def counting(self, images, original=cls.__call__):
            calls.append(len(images))
            return original(self, images)

        monkeypatch.setattr(cls, "__call__", counting)
    return calls


def open_page() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def picture(seed: int, fmt: str = "PNG", size: int = 96) -> bytes:
    buffer = io.BytesIO()
    render_photo(random_scene(np.random.default_rng(seed)), size).save(buffer, format=fmt)
    return buffer.getvalue()


def write(directory: Path, files: list[tuple[str, bytes]]) -> list[str]:
    paths = []
    for name, data in files:
        (directory / name).write_bytes(data)
        paths.append(str(directory / name))
    return paths


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` grey pixels but holds a few bytes of them."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def captions(at: AppTest) -> list[str]:
    return [s.value for s in at.main.subheader]


def beams(at: AppTest) -> list[list[tuple[str, float, float]]]:
    """Each photo's listed beams: (sentence, per-word probability in %, log-prob)."""
    line = re.compile(r"\d+\. (.+) :gray\[· (\d+)% per word · log-prob (-?[\d.]+)\]")
    return [
        [(m[1], float(m[2]), float(m[3])) for m in map(line.fullmatch, e.markdown[0].value.splitlines())]
        for e in at.main.expander if e.label.startswith("Top ")
    ]


def test_example_photo_gets_its_caption_and_beams(bundle_dir, app, page_captioner, tmp_path):
    at = open_page()
    assert "Add a photo" in at.main.info[0].value
    assert not captions(at)

    at.checkbox(key="example-coffee").check().run()
    assert not at.exception, at.exception
    expected = page_captioner.caption(app.EXAMPLES["Coffee"], num_results=3)
    assert captions(at) == [app.sentence(expected.caption)]
    assert any(c.value.startswith("coffee.jpg · beam search, width 3 · ") and c.value.endswith("% per word")
               for c in at.main.caption)
    [shown] = beams(at)
    assert shown == [(b.caption, pytest.approx(100 * b.word_probability, abs=0.5), pytest.approx(b.log_prob, abs=0.005))
                     for b in expected.beams]
    assert len(shown) == 3 and all(0 < p <= 100 for _, p, _ in shown)
    assert any("geometric mean" in c.value for c in at.main.caption)  # the figure is explained


def test_broken_files_get_one_error_each_and_the_rest_captions(bundle_dir, app, page_captioner, tmp_path):
    good = [("one.png", picture(11)), ("two.jpg", picture(12, "JPEG")), ("three.gif", picture(13, "GIF"))]
    bad = {
        "corrupt.jpg": (picture(14, "JPEG")[:300], "corrupt or truncated"),
        "notes.png": (b"shopping list: eggs, milk\n", "not an image"),
        "notes.txt": (b"a text file dropped by mistake\n", "not an image"),
        "empty.webp": (b"", "empty file"),
        "huge.png": (png_header_only(20_000, 20_000), "too large"),
        "zero.png": (png_header_only(0, 0), ""),
    }
    uploads = [good[0], *((name, data) for name, (data, _) in bad.items()), *good[1:]]
    expected = page_captioner.caption(write(tmp_path, good))

    at = open_page()
    at.file_uploader(key="uploads").set_value([(name, data, "image/png") for name, data in uploads]).run()
    assert not at.exception, at.exception
    assert captions(at) == [app.sentence(r.caption) for r in expected]
    errors = [e.value for e in at.main.error]
    assert len(errors) == len(bad)
    for error, (name, (_, reason)) in zip(errors, bad.items()):
        assert error.startswith(f"**{name}** could not be captioned: ") and reason in error
    assert any(m.value.startswith("**3 of 9 photos captioned** · 6 could not be read") for m in at.main.markdown)


def test_a_photo_unlike_the_training_photos_gets_a_plain_warning(bundle_dir, app, page_captioner, tmp_path):
    noise = Image.fromarray(np.random.default_rng(3).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    files = [("shapes.png", picture(31)), ("noise.png", buffer.getvalue())]
    expected = page_captioner.caption(write(tmp_path, files))
    assert [r.unfamiliar for r in expected] == [False, True]

    at = open_page()
    at.file_uploader(key="uploads").set_value([(name, data, "image/png") for name, data in files]).run()
    assert not at.exception, at.exception
    assert [w.value for w in at.main.warning] == [app.UNFAMILIAR_WARNING]  # the noise photo's card only
    assert "looks unlike the photos this model learned from" in app.UNFAMILIAR_WARNING
    shown = [c.value for c in at.main.caption if c.value.startswith("familiarity ")]
    assert shown == [f"familiarity {r.familiarity:.2f} (threshold {r.familiarity_threshold:.2f})" for r in expected]


def test_settings_change_recaptions_without_reencoding(bundle_dir, page_captioner, encoder_calls, tmp_path):
    files = [("a.png", picture(21)), ("b.png", picture(22))]
    paths = write(tmp_path, files)
    greedy = [r.caption for r in page_captioner.caption(paths, method="greedy")]
    short = [r.caption for r in page_captioner.caption(paths, method="greedy", max_len=3)]
    encoder_calls.clear()

    at = open_page()
    at.file_uploader(key="uploads").set_value([(n, d, "image/png") for n, d in files]).run()
    assert len(beams(at)) == 2 and sum(encoder_calls) == 2  # each photo encoded once

    at.radio(key="method").set_value("greedy").run()
    assert [c.lower().rstrip(".") for c in captions(at)] == greedy
    names = [c.value for c in at.main.caption if c.value.startswith(("a.png", "b.png"))]
    assert [name.split(" · ")[1] for name in names] == ["greedy", "greedy"]
    assert not beams(at)  # one sentence each: no beams to show

    at.slider(key="max_len").set_value(3).run()
    assert [c.lower().rstrip(".") for c in captions(at)] == short

    at.radio(key="method").set_value("beam").run()
    at.slider(key="beam_size").set_value(5).run()
    assert [len(b) for b in beams(at)] == [5, 5]
    assert not at.exception, at.exception
    assert sum(encoder_calls) == 2, "re-captioning with new settings encoded the photos again"


def test_missing_model_explains_how_to_get_one(trained_run, monkeypatch, tmp_path):
    monkeypatch.setenv("CAPTIONER_MODEL", str(tmp_path / "no-model-here"))
    at = open_page()
    assert "No caption model could be loaded" in at.main.warning[0].value
    assert "no-model-here" in at.main.warning[0].value
    assert "captioner train --data" in at.main.code[0].value
    assert not at.file_uploader

    # Typed folders: whatever is wrong, the page says the same thing, so it reveals nothing of the
    # server's files (whether a folder exists, where a link points).
    (tmp_path / "link").symlink_to("/etc")
    for typed in (str(tmp_path), str(tmp_path / "nothing-here"), "~", str(tmp_path / "link")):
        at.text_input(key="model_dir").input(typed).run()
        assert not at.exception, at.exception
        assert at.main.error[0].value.startswith("No model bundle could be loaded from that folder.")
        assert typed not in at.main.error[0].value and "/etc" not in at.main.error[0].value

    at.text_input(key="model_dir").input(str(trained_run[0] / "model")).run()
    assert not at.exception and not at.main.error and not at.main.warning
    at.checkbox(key="example-chelsea").check().run()
    assert len(captions(at)) == 1


def test_downloads_hold_every_caption_and_error(app, page_captioner, tmp_path):
    paths = write(tmp_path, [("good.png", picture(31)), ("bad.jpg", b"not a photo")])
    results = [replace(r, source=name) for r, name in
               zip(page_captioner.caption(paths, num_results=2), ["good.png", "bad.jpg"])]

    rows = list(csv.DictReader(io.StringIO(app.results_csv(results, 2))))
    assert [(row["image"], row["caption"]) for row in rows] == [("good.png", results[0].caption), ("bad.jpg", "")]
    assert float(rows[0]["log_prob"]) == pytest.approx(results[0].log_prob, abs=1e-4)
    assert rows[1]["error"] == results[1].error and rows[1]["log_prob"] == ""
    assert rows[0]["caption_2"] == results[0].beams[1].caption

    data = json.loads(app.results_json(results, 2, model="x", settings={"method": "beam", "beam_size": 2}))
    assert data["model"] == "x" and data["settings"]["beam_size"] == 2
    good, bad = data["captions"]
    assert good["caption"] == results[0].caption and len(good["beams"]) == 2
    assert bad["caption"] is None and "not an image" in bad["error"]


def test_example_photos_are_real_photos_the_loader_reads(app):
    assert sorted(app.EXAMPLES) == ["Astronaut", "Chelsea", "Coffee", "Rocket"]
    for name, path in app.EXAMPLES.items():
        assert load_image(path).shape[2] == 3 and Image.open(io.BytesIO(app.example_photo(name))).format == "JPEG"


def test_deployed_page_offers_named_models_only(trained_run, monkeypatch):
    monkeypatch.setenv("CAPTIONER_APP_MODELS", f"shapes={trained_run[0] / 'model'}, missing=/nowhere")
    at = open_page()
    assert not at.text_input  # no box to name a folder of the server
    assert at.selectbox(key="model_name").options == ["shapes", "missing"]
    at.checkbox(key="example-chelsea").check().run()
    assert len(captions(at)) == 1
    at.selectbox(key="model_name").select("missing").run()
    assert not at.exception, at.exception
    assert at.main.error[0].value.startswith("No model bundle could be loaded")
    assert "/nowhere" not in at.main.error[0].value


def test_page_fetches_nothing_from_outside(app):
    assert app.ICON.is_file() and "page_icon=str(ICON)" in APP.read_text()
    assert not re.search(r"https?://", APP.read_text().split('"""', 2)[2])  # no URL in the page's code


def test_limits_hold_wherever_the_page_is_started(bundle_dir, app):
    """Pixels per photo are limited in code, not only by .streamlit/config.toml (which applies
    only when the page is started from the repository's root): a 60-megapixel photo is refused
    from its header although the package's own limit (89 MP) would let it through."""
    at = open_page()
    at.file_uploader(key="uploads").set_value([("60mp.png", png_header_only(10000, 6000), "image/png")]).run()
    assert not at.exception, at.exception
    [error] = [e.value for e in at.main.error]
    assert error.startswith(f"**60mp.png** could not be captioned: image too large (10000x6000, over "
                            f"{app.MAX_PHOTO_PIXELS:,} pixels)")


def test_visitors_never_see_a_stack_trace(bundle_dir):
    """Set by the page itself: .streamlit/config.toml applies only when started from the repository."""
    from streamlit import config

    config.set_option("client.showErrorDetails", "full")
    open_page()
    assert config.get_option("client.showErrorDetails") == "none"
    assert config.get_option("client.toolbarMode") == "viewer"


def test_sidebar_says_what_runs_and_what_it_took(bundle_dir):
    at = open_page()
    assert any("runs on LiteRT" in c.value for c in at.sidebar.caption)  # the tiny bundle has LiteRT files
    at.checkbox(key="example-chelsea").check().run()
    [timing] = [c.value for c in at.sidebar.caption if c.value.startswith("Last run: 1 photo in ")]
    assert " ms a photo on LiteRT" in timing


@pytest.fixture
def attention_dir(attend_run, monkeypatch):
    """The tiny attention bundle, made the page's default model."""
    model = attend_run[0] / "model"
    monkeypatch.setenv("CAPTIONER_MODEL", str(model))
    return model


def test_an_attention_model_shows_where_it_looked_for_each_word(attention_dir, app, monkeypatch, tmp_path):
    drawn: list[np.ndarray] = []  # the weights of every heatmap the page draws

    def spy(photo, weights, *args, **kwargs):
        drawn.append(np.asarray(weights))
        return original(photo, weights, *args, **kwargs)

    original = attention_maps.overlay
    monkeypatch.setattr(attention_maps, "overlay", spy)
    files = [("one.png", picture(41, size=160))]
    loaded = Captioner.load(attention_dir)
    [expected] = loaded.caption(write(tmp_path, files), num_results=3)
    words = expected.caption.split()

    at = open_page()
    at.file_uploader(key="uploads").set_value([(n, d, "image/png") for n, d in files]).run()
    assert not at.exception, at.exception
    assert captions(at) == [app.sentence(expected.caption)]
    [chooser] = at.main.pills
    assert [label.replace("\u200b", "") for label in chooser.options] == words
    assert chooser.value is None  # the photo as it is, then the strip of every word's map
    card = [i.captions for i in at.main.image][len(app.EXAMPLES):]  # after the examples' pictures
    assert card == [[""], ["Every word: brighter where the model looked more"]]
    assert len(drawn) == len(words)
    for weights, word_map in zip(drawn, expected.attention):
        np.testing.assert_allclose(weights, word_map, atol=1e-5)

    # The last word repeated in the caption if there is one: repeats must be told apart.
    pick = max((i for i, w in enumerate(words) if w in words[:i]), default=len(words) - 1)
    drawn.clear()
    chooser.set_value(pick).run()
    assert not at.exception, at.exception
    assert at.main.pills[0].value == pick
    heatmap_caption = f"Where the model looked for “{words[pick]}”"
    assert [i.captions for i in at.main.image][len(app.EXAMPLES)] == [heatmap_caption]
    assert len(drawn) == len(words) + 1  # the strip, then the picked word's map over the photo
    np.testing.assert_allclose(drawn[-1], expected.attention[pick], atol=1e-5)
    assert any(f"runs on {app.runtime_name(loaded)}" in c.value for c in at.sidebar.caption)


def test_repeated_words_get_distinct_labels_that_look_the_same(app):
    labels = app.word_labels(["a", "red", "circle", "and", "a", "red", "square"])
    assert len(set(labels)) == 7
    assert [label.replace("\u200b", "") for label in labels] == ["a", "red", "circle", "and", "a", "red", "square"]
