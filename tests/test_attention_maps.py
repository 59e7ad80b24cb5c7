"""Attention maps drawn over photos (captioner.attention_maps): sizes, where the heat lies, the
strip of words, file names and files. Synthetic weights; no model, no TensorFlow."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner import attention_maps
from captioner.attention_maps import INFERNO, colormap, file_names, heatmap, overlay, preview, save_png, strip

ROOT = Path(__file__).resolve().parents[1]
GREY = 128


def peaked(grid: tuple[int, int], cells: list[tuple[int, int]]) -> np.ndarray:
    """One map per cell, almost all of its weight on that cell (rows sum to 1, as softmax gives)."""
    maps = np.full((len(cells), *grid), 0.01, np.float32)
    for i, (row, col) in enumerate(cells):
        maps[i, row, col] = 1.0
    return maps / maps.sum(axis=(1, 2), keepdims=True)


def cell_means(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Mean brightness of each cell of `grid` laid over the image: [rows, cols]."""
    rows, cols = grid
    h, w = image.shape[0] // rows, image.shape[1] // cols
    bright = image[: h * rows, : w * cols].astype(np.float32).mean(axis=2)
    return bright.reshape(rows, h, cols, w).mean(axis=(1, 3))


def grey_photo(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (GREY, GREY, GREY))


def test_colour_scale_runs_from_dark_to_bright():
    colours = colormap(np.linspace(0, 1, 50))
    assert colours.dtype == np.uint8 and colours.shape == (50, 3)
    np.testing.assert_array_equal(colours[0], INFERNO[0])
    np.testing.assert_array_equal(colours[-1], INFERNO[-1])
    lightness = colours.astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(lightness) > 0)  # brighter means more attention, also in grey
    np.testing.assert_array_equal(colormap(np.array([-1.0, 2.0, np.nan])), INFERNO[[0, -1, 0]].astype(np.uint8))


def test_heatmap_is_relative_to_the_strongest_region_and_smooth():
    [weights] = peaked((4, 4), [(1, 2)])
    heat = heatmap(weights, (200, 100))
    assert heat.shape == (100, 200) and heat.min() >= 0 and heat.max() <= 1
    row, col = np.unravel_index(heat.argmax(), heat.shape)
    assert 25 <= row < 50 and 100 <= col < 150  # inside cell (1, 2) of the 4x4 map
    assert heat.max() > 0.9
    # Bicubic, not blocks: many levels between the peak and the floor.
    assert len(np.unique(np.round(heat, 3))) > 50
    assert not heatmap(np.zeros((3, 3)), (9, 9)).any()  # no weight anywhere: no heat
    with pytest.raises(ValueError, match=r"must be a 2-D map \[H, W\], got shape \(4,\)"):
        heatmap(np.ones(4), (8, 8))


@pytest.mark.parametrize("cell", [(0, 0), (1, 3), (3, 1)])
def test_overlay_is_the_photos_size_and_hot_where_the_weight_is(cell):
    photo = grey_photo(240, 160)  # not square: the map is stretched over the whole photo
    [weights] = peaked((4, 4), [cell])
    shown = overlay(photo, weights)
    assert shown.mode == "RGB" and shown.size == photo.size
    means = cell_means(np.asarray(shown), (4, 4))
    assert np.unravel_index(means.argmax(), means.shape) == cell
    assert means[cell] > GREY + 20  # brighter than the photo where it looked ...
    assert np.delete(means.ravel(), np.ravel_multi_index(cell, (4, 4))).max() < GREY  # ... dimmed elsewhere


def test_overlay_takes_arrays_and_paths_and_even_weights_tint_evenly(tmp_path):
    array = np.asarray(grey_photo(50, 30))
    path = tmp_path / "grey.png"
    grey_photo(50, 30).save(path)
    even = np.full((7, 7), 1 / 49, np.float32)
    for photo in (array, path):
        shown = np.asarray(overlay(photo, even))
        assert shown.shape == (30, 50, 3)
        assert len(np.unique(shown.reshape(-1, 3), axis=0)) == 1  # no region stands out


def test_strip_shows_each_words_map_with_the_word_under_it():
    words = ["a", "red", "circle", "and", "square"]
    cells = [(0, 0), (0, 3), (3, 3), (3, 0), (2, 1)]
    sheet = strip(grey_photo(300, 200), words, peaked((4, 4), cells), size=120, columns=3)
    # Tiles of the thumbnail's size (120 x 80), 3 to a row, so two rows, with room for the words.
    gap, label = 4, round(max(11, 120 // 7) * 1.7)
    assert sheet.size == (3 * (120 + gap) + gap, 2 * (80 + label) + gap)
    pixels = np.asarray(sheet)
    for i, cell in enumerate(cells):
        x, y = gap + (i % 3) * (120 + gap), gap + (i // 3) * (80 + label)
        tile = pixels[y : y + 80, x : x + 120]
        means = cell_means(tile, (4, 4))
        assert np.unravel_index(means.argmax(), means.shape) == cell, words[i]
        under = pixels[y + 80 : y + 80 + label, x : x + 120]
        assert (under < 128).any(), f"no text under {words[i]!r}"  # dark ink on white
    assert (pixels[-label:, -(120 + gap):] == 255).all()  # the sixth place stays empty
    # Rows as even as they can be: 7 words at most 6 to a row are 4 + 3.
    assert strip(grey_photo(40, 40), list("abcdefg"), np.ones((7, 2, 2)) / 4, size=40).width == 4 * (40 + 4) + 4


def test_strip_checks_its_input_and_draws_a_caption_without_words():
    photo = grey_photo(64, 64)
    with pytest.raises(ValueError, match=r"\[words, H, W\] for 2 words, got shape \(3, 4, 4\)"):
        strip(photo, ["a", "b"], np.ones((3, 4, 4)))
    empty = strip(photo, [], np.zeros((0, 4, 4)), size=64)
    assert empty.width == 64 + 2 * 4
    tile = np.asarray(empty)[4:68, 4:68]
    assert (tile == GREY).all()  # the plain photo: nothing to overlay


def test_a_small_photo_is_enlarged_to_the_tile_size():
    sheet = strip(grey_photo(32, 16), ["a"], peaked((2, 2), [(0, 1)]), size=64)
    label = round(max(11, 64 // 7) * 1.7)
    assert sheet.size == (64 + 2 * 4, 32 + label + 4)


def test_a_long_word_is_cut_to_its_tile():
    sheet = strip(grey_photo(64, 64), ["extraordinarily-long-word"], peaked((2, 2), [(0, 0)]), size=64)
    assert sheet.width == 64 + 2 * 4  # the word did not widen the sheet


def test_preview_reads_bytes_upright_and_shrinks(tmp_path):
    photo = Image.new("RGB", (400, 100), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", exif=exif.tobytes())
    small = preview(buffer.getvalue(), 80)
    assert small.size == (20, 80) and small.mode == "RGB"  # turned upright, then fitted into 80 x 80
    assert preview(grey_photo(30, 20), 80).size == (30, 20)  # never enlarged
    with pytest.raises(ValueError, match="not an image"):
        preview(b"%PDF-1.4 not a photo", 80)


def test_file_names_are_distinct_for_photos_of_the_same_name():
    photos = ["a/x.jpg", "b/x.jpg", "b/x.png", "c/X.JPG", "c/y.jpeg", "x-2.jpg"]
    assert file_names(photos) == {"a/x.jpg": "x.png", "b/x.jpg": "x-2.png", "b/x.png": "x-3.png",
                                  "c/X.JPG": "X-4.png", "c/y.jpeg": "y.png", "x-2.jpg": "x-2-2.png"}


def test_save_png_writes_the_whole_picture_and_nothing_else(tmp_path):
    picture = strip(grey_photo(40, 40), ["a"], peaked((2, 2), [(1, 1)]), size=40)
    save_png(picture, tmp_path / "maps" / "a.png")
    assert os.listdir(tmp_path / "maps") == ["a.png"]  # no temporary left behind
    with Image.open(tmp_path / "maps" / "a.png") as saved:
        assert saved.format == "PNG"
        np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), np.asarray(picture))


def test_drawing_maps_imports_no_tensorflow():
    script = ("import sys, numpy as np\n"
              "from PIL import Image\n"
              "from captioner.attention_maps import strip\n"
              "strip(Image.new('RGB', (32, 32)), ['a'], np.ones((1, 2, 2)) / 4)\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'matplotlib')))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "[]", done.stdout
    assert attention_maps.__doc__ and "TensorFlow" in attention_maps.__doc__
