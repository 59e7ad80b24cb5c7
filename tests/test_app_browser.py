"""The page in a real browser: `streamlit run app.py` driven by headless Chromium through Playwright.

Uses scripts/screenshot_app.py, the code that takes the README's screenshots (docs/app.png and
docs/app-attention.png).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def load_screenshot_script():
    spec = importlib.util.spec_from_file_location("screenshot_app", ROOT / "scripts" / "screenshot_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shots = load_screenshot_script()


def need_chromium() -> None:
    if not shots.CHROMIUM.exists():
        missing = f"{shots.CHROMIUM} not installed (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):  # .ci/run installs it: a missing browser there is a broken CI, not a skip
            pytest.fail(missing)
        pytest.skip(missing)


def test_uploaded_photos_are_captioned_in_the_browser(trained_run, trained_captioner, tmp_path):
    need_chromium()
    (tmp_path / "photos").mkdir()
    photos = shots.demo_photos(tmp_path / "photos")
    *good, broken = photos
    expected = [r.caption for r in trained_captioner.caption([str(p) for p in good])]

    screenshot = tmp_path / "app.png"
    with shots.serve_app(trained_run[0] / "model", tmp_path / "streamlit.log") as url:
        shown = shots.capture_app(url, photos, screenshot)

    assert [text.lower().rstrip(".") for text in shown.cards[:-1]] == expected
    assert f"{broken.name} could not be captioned: corrupt or truncated image" in shown.cards[-1]
    assert shown.heatmap is None
    with Image.open(screenshot) as image:
        assert image.format == "PNG" and image.width == shots.WIDTH and image.height >= 900


def test_an_attention_models_heatmap_shows_in_the_browser(attend_run, tmp_path):
    """The page of docs/app-attention.png: a word picked, its heatmap over the photo."""
    need_chromium()
    from captioner.captioner import Captioner

    (tmp_path / "photos").mkdir()
    *photos, _ = shots.demo_photos(tmp_path / "photos", count=2)  # no broken file this time
    model = attend_run[0] / "model"
    expected = Captioner.load(model).caption([str(p) for p in photos], num_results=3)  # the page's settings
    word = len(expected[0].caption.split()) - 1  # the last word: a shape, whose place the model learned

    screenshot = tmp_path / "app-attention.png"
    with shots.serve_app(model, tmp_path / "streamlit.log") as url:
        shown = shots.capture_app(url, photos, screenshot, word=word)

    assert [text.lower().rstrip(".") for text in shown.cards] == [r.caption for r in expected]
    assert shown.heatmap == f"Where the model looked for “{expected[0].caption.split()[word]}”"
    with Image.open(screenshot) as image:
        assert image.format == "PNG" and image.width == shots.WIDTH and image.height >= 900
