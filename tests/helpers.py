"""Small stand-ins shared by several test modules (imported as `helpers`: pytest puts tests/ on the path)."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

IDENTITY = {"name": "flat", "weights_id": "mean-colour", "image_size": 8, "feature_dim": 3}


class CountingEncoder:
    """Mean colour as the feature; remembers how many photos it encoded."""

    image_size, feature_dim = 8, 3

    def __init__(self):
        self.encoded = 0

    def __call__(self, images):
        self.encoded += len(images)
        return np.asarray(images, np.float32).mean(axis=(1, 2))

    def describe(self):
        return IDENTITY


class StubEncoder:
    """Looks like an ImageEncoder to `Captioner` where only its identity matters."""

    def __init__(self, identity: dict):
        self.identity = identity

    def describe(self):
        return self.identity


def edit_config(bundle: Path, **changes) -> None:
    """Change top-level fields of a bundle's config.json, as a hand edit or a tampered download would."""
    config = json.loads((bundle / "config.json").read_text())
    config.update(changes)
    (bundle / "config.json").write_text(json.dumps(config))


def edit_decoder_file(bundle: Path, edit=None, replace_members: dict[str, bytes] | None = None) -> None:
    """Rewrite decoder.keras: `edit` changes the architecture JSON inside it (the whole document),
    `replace_members` swaps whole zip members."""
    with zipfile.ZipFile(bundle / "decoder.keras") as z:
        files = {n: z.read(n) for n in z.namelist()}
    if edit is not None:
        config = json.loads(files["config.json"])
        edit(config)
        files["config.json"] = json.dumps(config).encode()
    files.update(replace_members or {})
    with zipfile.ZipFile(bundle / "decoder.keras", "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
