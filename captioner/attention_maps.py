"""Attention maps as pictures: where an attention model looked while it wrote each word.

A word's weights over the encoder's map (e.g. 8x8) are upsampled smoothly to the photo's size and
blended over it with a colour scale, dark where the model did not look and bright yellow where it
did. Pillow and NumPy only: the app, the CLI and the notebooks draw them the same way, and nothing
here imports TensorFlow.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from captioner.fileio import atomic_write_bytes
from captioner.images import ALLOWED_FORMATS, ImageError, ImageSource, load_image

# matplotlib's "inferno" at 9 even steps (matplotlib is not a dependency): even in lightness, so
# how bright a region is says how much attention it got, in colour or in grey.
INFERNO = np.array([(0, 0, 4), (33, 12, 74), (87, 16, 110), (138, 34, 106), (188, 55, 84), (228, 90, 49),
                    (249, 142, 9), (249, 203, 53), (252, 255, 164)], np.float32)
# The colour's share of a blended pixel: ALPHA where the model looked most, falling to ALPHA * FLOOR
# where it did not look, so the photo stays visible everywhere, dimmed away from the hot regions.
ALPHA, FLOOR = 0.7, 0.45
BACKGROUND, INK = (255, 255, 255), (40, 40, 40)


def preview(photo: ImageSource | bytes, max_side: int) -> Image.Image:
    """The photo, upright RGB, shrunk to fit `max_side` x `max_side` (never enlarged). Takes what
    `load_image` takes, or a file's bytes (read with the same allow-list of formats)."""
    if isinstance(photo, bytes):
        try:
            photo = Image.open(io.BytesIO(photo), formats=ALLOWED_FORMATS)
        except UnidentifiedImageError:
            raise ImageError("<bytes>", "not an image in a supported format") from None
        photo.draft("RGB", (max_side, max_side))  # a large JPEG is decoded at reduced scale
    image = Image.fromarray(load_image(photo))
    image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image


def colormap(heat: np.ndarray) -> np.ndarray:
    """Colours [..., 3] (uint8) of values from 0 (not looked at) to 1 (looked at most)."""
    x = np.clip(np.nan_to_num(heat), 0.0, 1.0) * (len(INFERNO) - 1)
    low = np.minimum(x.astype(np.int64), len(INFERNO) - 2)
    share = (x - low)[..., None]
    return np.round(INFERNO[low] * (1 - share) + INFERNO[low + 1] * share).astype(np.uint8)


def heatmap(weights: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One word's weights [H, W] as heat [height, width] in 0..1 for an image of `size` (width,
    height): relative to the word's strongest region, upsampled bicubically.

    The encoder squashes the whole photo to its square input, so its map spans the whole photo
    whatever the photo's shape."""
    weights = np.asarray(weights, np.float32)
    if weights.ndim != 2 or 0 in weights.shape:
        raise ValueError(f"attention weights must be a 2-D map [H, W], got shape {weights.shape}")
    weights = np.clip(np.nan_to_num(weights), 0.0, None)
    peak = float(weights.max())
    relative = weights / peak if peak > 0 else weights
    smooth = Image.fromarray(relative).resize(size, Image.Resampling.BICUBIC)
    return np.clip(np.asarray(smooth), 0.0, 1.0)  # bicubic overshoots a little around peaks


def overlay(photo: ImageSource, weights: np.ndarray, alpha: float = ALPHA) -> Image.Image:
    """The photo with one word's attention blended over it, at the photo's size; `alpha` is the
    colour's share where the model looked most.

    `photo`: a PIL image, an RGB array or a path; `weights`: that word's map [H, W]
    (e.g. `result.attention[i]`)."""
    rgb = load_image(photo).astype(np.float32)
    heat = heatmap(weights, (rgb.shape[1], rgb.shape[0]))
    share = (alpha * (FLOOR + (1 - FLOOR) * heat))[..., None]
    blended = (1 - share) * rgb + share * colormap(heat).astype(np.float32)
    return Image.fromarray(np.round(blended).astype(np.uint8))


def strip(photo: ImageSource | bytes, words: Sequence[str], attention: np.ndarray, size: int = 128,
          columns: int = 6) -> Image.Image:
    """Every word's heatmap over a thumbnail of the photo (its longer side `size` pixels), the
    word under each, at most `columns` to a row.

    `attention` is [words, H, W] (`CaptionResult.attention`); a caption without words gives the
    plain thumbnail."""
    attention = np.asarray(attention)
    if attention.ndim != 3 or len(attention) != len(words):
        raise ValueError(f"attention must be [words, H, W] for {len(words)} words, got shape {attention.shape}")
    if size < 16 or columns < 1:
        raise ValueError(f"size must be at least 16 and columns at least 1, got {size} and {columns}")
    thumb = preview(photo, size)
    if max(thumb.size) < size:  # a small photo is enlarged, so its words fit under it
        scale = size / max(thumb.size)
        thumb = thumb.resize((round(thumb.width * scale), round(thumb.height * scale)), Image.Resampling.BICUBIC)
    tiles = [(overlay(thumb, w), word) for word, w in zip(words, attention)] or [(thumb, "(no words)")]
    font_size = max(11, size // 7)
    font = ImageFont.load_default(size=font_size)
    gap, label = max(4, size // 32), round(font_size * 1.7)
    rows = math.ceil(len(tiles) / columns)
    cols = math.ceil(len(tiles) / rows)  # rows as even as they can be: 7 words are 4 + 3, not 6 + 1
    width, height = thumb.width + gap, thumb.height + label
    sheet = Image.new("RGB", (cols * width + gap, rows * height + gap), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, (tile, word) in enumerate(tiles):
        x, y = gap + (i % cols) * width, gap + (i // cols) * height
        sheet.paste(tile, (x, y))
        text = _fit(draw, word, font, thumb.width)
        draw.text((x + thumb.width / 2, y + thumb.height + label / 2), text, fill=INK, font=font, anchor="mm")
    return sheet


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, cut short with an ellipsis if it is wider than `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write `image` as a PNG file, atomically (a reader never sees half a picture)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def file_names(photos: Sequence[str]) -> dict[str, str]:
    """A distinct PNG file name for each photo path: its name with `.png` for its extension, then
    `-2`, `-3`... for photos of the same name in other folders (in the order given; compared
    regardless of case, for file systems that ignore it)."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for photo in photos:
        stem = Path(photo).stem or "photo"
        name, n = f"{stem}.png", 1
        while name.lower() in taken:
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name.lower())
        names[photo] = name
    return names
