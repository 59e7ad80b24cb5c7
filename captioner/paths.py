"""Where captioner finds and keeps things. The only module that reads its environment variables.

    CAPTIONER_HOME   caches and converted encoder weights (default ~/.cache/captioner)
    CAPTIONER_MODEL  the model bundle used when none is named, a folder or a shipped model's name
                     (default: the shipped model "default")
    CAPTIONER_DATA   the dataset folder used when none is named (default: data/flickr8k in the
                     project's checkout, the folder the README says to unpack Flickr8k into)
"""
from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
ENCODER_ASSETS = ASSETS / "encoders"  # converted encoder weights shipped with the package, ImageNet class names
MODELS = ASSETS / "models"  # the bundles shipped with the package, one folder each, named by it
SHIPPED_MODEL = MODELS / "default"
CHECKOUT = Path(__file__).resolve().parents[1]  # the project folder for the README's `pip install -e .`


def _setting(name: str, default: str | Path) -> Path:
    return Path(os.environ.get(name) or default).expanduser()


def home() -> Path:
    """`$CAPTIONER_HOME`, default `~/.cache/captioner`."""
    return _setting("CAPTIONER_HOME", "~/.cache/captioner")


def feature_cache_dir() -> Path:
    """Where encoded photos are cached: `$CAPTIONER_HOME/features`."""
    return home() / "features"


def encoder_weights_dir() -> Path:
    """Where `scripts/convert_encoder_weights.py` writes encoder weights: `$CAPTIONER_HOME/encoders`."""
    return home() / "encoders"


def encoder_weights_files(name: str) -> list[Path]:
    """Where encoder NAME's converted weights may be, in the order they are looked for: shipped
    with the package, then converted by this user."""
    return [ENCODER_ASSETS / f"{name}.weights.h5", encoder_weights_dir() / f"{name}.weights.h5"]


def shipped_models() -> list[str]:
    """The names of the bundles shipped with the package ("default", ...)."""
    if not MODELS.is_dir():
        return []
    return sorted(p.name for p in MODELS.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def model_dir(model: str | Path | None = None) -> Path:
    """The bundle folder `model` names: a folder, else a shipped model's name (a folder of that
    name wins; a path with a separator, such as ./default, is never a name); None:
    `$CAPTIONER_MODEL` (a folder or a name), else the shipped model."""
    if model is None:
        model = os.environ.get("CAPTIONER_MODEL") or SHIPPED_MODEL
    path = Path(model).expanduser()
    is_name = isinstance(model, str) and not any(sep in model for sep in (os.sep, os.altsep) if sep)
    if is_name and not path.is_dir() and model in shipped_models():
        return MODELS / model
    return path


def default_data() -> Path:
    """The dataset folder used when none is named: `$CAPTIONER_DATA`, else `data/flickr8k` of the
    checkout (the same folder from the CLI in any directory and from the notebooks)."""
    return _setting("CAPTIONER_DATA", CHECKOUT / "data" / "flickr8k")
