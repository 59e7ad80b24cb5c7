"""Serve app.py, drop photos on it in headless Chromium, and screenshot the page.

    python scripts/screenshot_app.py --model runs/x/model               # -> docs/app.png
    python scripts/screenshot_app.py --model runs/x/model a.jpg b.png   # your own photos
    python scripts/screenshot_app.py --model runs/attend/model --word 3 --output docs/app-attention.png

Without photos it draws three pictures of shapes and adds one broken file, so the picture shows
captions and an error. With `--word N` (an attention model) it picks the first photo's word N
(from 0), so the picture shows where the model looked for it. tests/test_app_browser.py drives the page through these same functions,
so the README's screenshot is what CI checks. Needs Debian's `chromium` and Playwright's Python package.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run against this checkout
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WIDTH = 1280


def free_port() -> int:
    """A TCP port nobody listens on at the moment, on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_app(model_dir: str | Path, log_path: str | Path, timeout: float = 120) -> Iterator[str]:
    """Run `streamlit run app.py` on a free loopback port with `model_dir` as the default model;
    yield its URL once it answers, and stop it afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CAPTIONER_MODEL": str(model_dir), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
               "--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none",
               "--browser.gatherUsageStats", "false"]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not _healthy(url):
                if server.poll() is not None or time.monotonic() > deadline:
                    tail = Path(log_path).read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"streamlit did not start on {url}; its log ends:\n{tail}")
                time.sleep(0.3)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.read().strip() == b"ok"
    except OSError:
        return False


class Shown(NamedTuple):
    cards: list[str]  # what the page shows for each photo, in order: its caption or its error
    heatmap: str | None = None  # the caption under the picked word's heatmap


def capture_app(url: str, photos: Sequence[str | Path], screenshot: str | Path, timeout: float = 120,
                word: int | None = None) -> Shown:
    """Upload `photos` to the page at `url`, wait until each has a caption or an error, pick the
    first photo's `word` (attention models), save a screenshot of the whole page, and return what
    the page shows."""
    from playwright.sync_api import sync_playwright

    timeout_ms = timeout * 1000
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 900})
            page.goto(url, timeout=timeout_ms)
            page.locator("input[type=file]").set_input_files([str(p) for p in photos], timeout=timeout_ms)
            cards = [page.locator(f".st-key-result-{i}").locator("h3, [data-testid=stAlert] [data-testid=stMarkdownContainer]").first
                     for i in range(len(photos))]
            for card in cards:
                card.wait_for(timeout=timeout_ms)
            page.locator("[data-testid=stStatusWidget]").wait_for(state="hidden", timeout=timeout_ms)
            heatmap = None
            if word is not None:
                page.locator(".st-key-result-0 [data-testid=stButtonGroup] button[role=radio]").nth(word).click()
                caption = page.locator(".st-key-result-0 [data-testid=stImageCaption]",
                                       has_text="Where the model looked for").first
                caption.wait_for(timeout=timeout_ms)
                # Until the rerun ends, the card holds the old elements too: wait for the heatmap
                # and the strip, and nothing stale.
                page.wait_for_function("document.querySelectorAll('.st-key-result-0 [data-testid=stImageCaption]')"
                                       ".length === 2 && !document.querySelector('.st-key-result-0 [data-stale=true]')",
                                       timeout=timeout_ms)
                heatmap = caption.inner_text().strip()
            beams = page.locator(".st-key-result-0 [data-testid=stExpander] summary")
            if beams.count():  # show off the first photo's beams
                beams.click()
                page.locator(".st-key-result-0 [data-testid=stExpanderDetails] li").first.wait_for(timeout=timeout_ms)
                page.wait_for_timeout(800)  # the expander opens with an animation
            page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)",
                                   timeout=timeout_ms)
            # The page scrolls inside Streamlit's main container, not the document: grow the window to fit.
            height = page.evaluate("document.querySelector('[data-testid=stMainBlockContainer]').scrollHeight")
            page.set_viewport_size({"width": WIDTH, "height": min(max(int(height) + 40, 900), 4000)})
            page.wait_for_timeout(500)  # let the layout settle at the new size
            page.screenshot(path=str(screenshot))
            return Shown([card.inner_text().strip() for card in cards], heatmap)
        finally:
            browser.close()


def demo_photos(directory: str | Path, count: int = 3, seed: int = 7) -> list[Path]:
    """`count` generated pictures of shapes (PNG, JPEG, WebP, ...) and a truncated JPEG, last."""
    from captioner.synthetic import random_scene, render_photo

    directory = Path(directory)
    rng = np.random.default_rng(seed)
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"), ("bmp", "BMP"), ("gif", "GIF")]
    paths = []
    for i in range(count):
        suffix, fmt = formats[i % len(formats)]
        path = directory / f"shapes-{i + 1}.{suffix}"
        render_photo(random_scene(rng), 256).save(path, format=fmt)
        paths.append(path)
    broken = directory / "broken.jpg"
    # cut off mid-picture, as by a failed download
    render_photo(random_scene(rng), 256).save(broken, format="JPEG")
    broken.write_bytes(broken.read_bytes()[:400])
    return [*paths, broken]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", nargs="*", help="photos to upload (default: generated shapes and a broken file)")
    parser.add_argument("--model", required=True, help="model bundle directory the page loads")
    parser.add_argument("--output", default=str(ROOT / "docs" / "app.png"), help="screenshot file (PNG)")
    parser.add_argument("--word", type=int, metavar="N",
                        help="attention models: show where the model looked for word N (from 0) of the first photo")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        parser.error(f"{CHROMIUM} not found; install it with: apt-get install -y chromium chromium-driver")
    with tempfile.TemporaryDirectory() as tmp:
        photos = args.photos or demo_photos(tmp)
        with serve_app(args.model, Path(tmp) / "streamlit.log") as url:
            shown = capture_app(url, photos, args.output, word=args.word)
    for photo, text in zip(photos, shown.cards):
        print(f"{Path(photo).name}: {text}")
    if shown.heatmap:
        print(shown.heatmap)
    print(f"screenshot written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
