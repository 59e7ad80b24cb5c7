"""Synthetic captioned pictures of coloured shapes: a dataset a tiny model learns in a minute.

The encoder sees a picture only as a global-average-pooled CNN feature, which keeps which colours
and shapes are present but little of where they are. So captions speak only of the shapes' colours
and kinds, how many there are and the background colour, never of positions; the order in which a
caption names two shapes is random for the same reason.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from captioner.fileio import atomic_write_text
from captioner.text import tokenize

JSON_NAME = "dataset_shapes.json"
IMAGE_DIR = "images"

# far apart in RGB and from every background, so each stays distinct after pooling
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 190),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
NOUNS = {"circle": ("circle", "disk"), "square": ("square", "box"), "triangle": ("triangle",)}
SHAPES = tuple(NOUNS)

# {x}, {y}: "<colour> <noun>" of each shape; {bg}: the background colour
ONE_SHAPE = (
    "a {x}",
    "a {x} on a {bg} background",
    "a single {x} on a {bg} background",
    "one {x} against a {bg} background",
    "a {bg} background with a {x}",
    "a {bg} background with one {x}",
)
TWO_SHAPES = (
    "a {x} and a {y}",
    "a {x} next to a {y}",
    "a {x} beside a {y}",
    "a {x} and a {y} on a {bg} background",
    "two shapes a {x} and a {y} on a {bg} background",
    "two shapes on a {bg} background a {x} and a {y}",
    "a {bg} background with a {x} and a {y}",
)
MIN_CAPTIONS, MAX_CAPTIONS = 3, 5

WORDS = frozenset(
    w
    for text in (*ONE_SHAPE, *TWO_SHAPES, *COLOURS, *BACKGROUNDS, *(n for ns in NOUNS.values() for n in ns))
    for w in tokenize(text.format(x="", y="", bg=""))
)
"""Every word a caption can use."""


@dataclass(frozen=True)
class Shape:
    """One filled shape; centre and size are fractions of the image side, so any size renders alike."""

    kind: str  # one of SHAPES
    colour: str  # a key of COLOURS
    cx: float
    cy: float
    size: float


@dataclass(frozen=True)
class Scene:
    """What a picture shows: one or two shapes of distinct colours on a plain background."""

    shapes: tuple[Shape, ...]
    background: str  # a key of BACKGROUNDS


def random_scene(rng: np.random.Generator) -> Scene:
    """One or two shapes of distinct colours, placed so they never overlap."""
    count = int(rng.integers(1, 3))
    background = str(rng.choice(list(BACKGROUNDS)))
    colours = [str(c) for c in rng.choice(list(COLOURS), size=count, replace=False)]
    kinds = [str(k) for k in rng.choice(SHAPES, size=count)]
    if count == 1:
        size = float(rng.uniform(0.35, 0.6))
        boxes = [(0.0, 0.0, 1.0, 1.0)]
    else:
        size = float(rng.uniform(0.25, 0.4))
        # each shape in its own half (side by side or stacked, at random) so neither hides the other
        side_by_side = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
        stacked = [(0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)]
        halves = side_by_side if rng.random() < 0.5 else stacked
        boxes = [halves[i] for i in rng.permutation(2)]
    m = size / 2 + 0.03  # margin from the box edges
    shapes = tuple(
        Shape(kind, colour, float(rng.uniform(x0 + m, x1 - m)), float(rng.uniform(y0 + m, y1 - m)), size)
        for kind, colour, (x0, y0, x1, y1) in zip(kinds, colours, boxes)
    )
    return Scene(shapes, background)


def scene_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """3-5 distinct captions of `scene` from different templates, with random synonyms and order."""
    templates = ONE_SHAPE if len(scene.shapes) == 1 else TWO_SHAPES
    count = int(rng.integers(MIN_CAPTIONS, MAX_CAPTIONS + 1))
    captions = []
    for t in rng.choice(len(templates), size=count, replace=False):
        phrases = [f"{s.colour} {rng.choice(NOUNS[s.kind])}" for s in scene.shapes]
        rng.shuffle(phrases)
        captions.append(templates[t].format(x=phrases[0], y=phrases[-1], bg=scene.background))
    return captions


def render_scene(spec: Scene, image_size: int) -> Image.Image:
    """Draw `spec` as an RGB image of `image_size` x `image_size` pixels."""
    scale = 4  # draw large and shrink, for smooth edges like a photo's rather than jagged ones
    side = image_size * scale
    image = Image.new("RGB", (side, side), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(image)
    for s in spec.shapes:
        cx, cy, half = s.cx * side, s.cy * side, s.size * side / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        colour = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse(box, fill=colour)
        elif s.kind == "square":
            draw.rectangle(box, fill=colour)
        elif s.kind == "triangle":
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
        else:
            raise ValueError(f"unknown shape kind {s.kind!r}; expected one of {SHAPES}")
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def render_photo(spec: Scene, size: int = 320, drawn_at: int = 64) -> Image.Image:
    """`spec` drawn as the dataset draws it (`drawn_at` pixels, soft edges), enlarged to `size`.

    A demo photo for models trained on the shapes: a CNN sees a sharp large drawing quite
    differently from the blurry enlargement of a small one, and would then miss colours.
    """
    return render_scene(spec, drawn_at).resize((size, size), Image.Resampling.BICUBIC)


def make_shapes_dataset(
    root: str | Path,
    n_images: int = 300,
    image_size: int = 64,
    seed: int = 0,
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> Path:
    """Write `n_images` PNGs under `root/images/` and a Karpathy-style `root/dataset_shapes.json`.

    `splits` are the train/val/test fractions. The same arguments give the same bytes. The JSON is
    written last (atomically), so an interrupted run never leaves a loadable half dataset.
    Returns `root`, which `captioner.data.load_dataset` reads (it looks for images in `images/`).
    """
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    if len(splits) != 3 or min(splits) < 0 or abs(sum(splits) - 1) > 1e-6:
        raise ValueError(f"splits must be train/val/test fractions summing to 1, got {splits}")
    n_val, n_test = round(n_images * splits[1]), round(n_images * splits[2])
    n_train = n_images - n_val - n_test
    split_names = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test

    root = Path(root)
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for i, split in enumerate(split_names):
        scene = random_scene(rng)
        captions = scene_captions(scene, rng)
        filename = f"shapes_{i:05d}.png"
        render_scene(scene, image_size).save(root / IMAGE_DIR / filename)
        entries.append(
            {
                "filename": filename,
                "imgid": i,
                "split": split,
                "sentences": [{"raw": c, "tokens": tokenize(c)} for c in captions],
            }
        )
    atomic_write_text(root / JSON_NAME, json.dumps({"dataset": "shapes", "images": entries}, indent=1))
    return root
