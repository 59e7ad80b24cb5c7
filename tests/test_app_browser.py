"""The page in a real browser: `streamlit run app.py` driven by headless Chromium through Playwright.

Uses scripts/screenshot_app.py, the code that takes the README's screenshot (docs/app.png).
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


def test_uploaded_photos_are_captioned_in_the_browser(trained_run, trained_captioner, tmp_path):
    if not shots.CHROMIUM.exists():
        missing = f"{shots.CHROMIUM} not installed (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):  # .ci/run installs it: a missing browser there is a broken CI, not a skip
            pytest.fail(missing)
        pytest.skip(missing)
    (tmp_path / "photos").mkdir()
    photos = shots.demo_photos(tmp_path / "photos")
    *good, broken = photos
    expected = [r.caption for r in trained_captioner.caption([str(p) for p in good])]

    screenshot = tmp_path / "app.png"
    with shots.serve_app(trained_run[0] / "model", tmp_path / "streamlit.log") as url:
        shown = shots.capture_app(url, photos, screenshot)

    assert [text.lower().rstrip(".") for text in shown[:-1]] == expected
    assert f"{broken.name} could not be captioned: corrupt or truncated image" in shown[-1]
    with Image.open(screenshot) as image:
        assert image.format == "PNG" and image.width == shots.WIDTH and image.height >= 900
