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


def caption_on_litert_in_a_new_process(model: str | Path | None, photo: str | Path,
                                       show: str = "result.caption") -> tuple[list[str], list[str], str]:
    """Caption `photo` with `Captioner.load(model, runtime='litert')` in a fresh interpreter.
    Returns `show` (comma-separated expressions of `result`) as strings, the TensorFlow/Keras
    modules that process imported, and its stderr: the caption path must import none."""
    import os
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "from captioner import Captioner\n"
        f"result = Captioner.load({str(model) if model else None!r}, runtime='litert').caption({str(photo)!r})\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))\n"
        f"print(json.dumps({{'shown': [str(x) for x in ({show},)], 'heavy': heavy}}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          check=True)
    out = json.loads(done.stdout)
    return out["shown"], out["heavy"], done.stderr
