"""Model bundles: one directory holding config, vocabulary and decoder, loaded with one call.

    <bundle>/config.json   format version, encoder identity, decoder sizes, decoding defaults
    <bundle>/vocab.json    the vocabulary (ids 0..3 are <pad> <start> <end> <unk>)
    <bundle>/decoder.keras the Keras model file (architecture + weights), loaded in safe mode

Bundles may come from strangers, so loading runs no code from them: Keras `safe_mode`,
no pickle, and a check that the model file names only Keras layers and `ShowAndTell`.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from captioner import __version__
from captioner.decoding import DecodeOptions
from captioner.fileio import atomic_path
from captioner.model import ShowAndTell
from captioner.text import Vocabulary

FORMAT = "captioner-bundle"
FORMAT_VERSION = 1
CONFIG, VOCAB, DECODER = "config.json", "vocab.json", "decoder.keras"


class BundleError(ValueError):
    """A bundle that cannot be loaded; the message names the bundle and the reason."""


@dataclass
class Bundle:
    """Everything needed to caption with a trained decoder, apart from the encoder itself."""

    model: ShowAndTell
    vocab: Vocabulary
    encoder: dict            # ImageEncoder.describe(): name, weights_id, image_size, feature_dim
    max_len: int = 30
    decoding: dict = field(default_factory=lambda: {k: getattr(DecodeOptions(), k)
                                                    for k in ("method", "beam_size", "length_penalty")})
    info: dict = field(default_factory=dict)  # training data, metrics, time: for people, not code

    def save(self, directory: str | Path) -> Path:
        """Write the bundle atomically: readers see the old bundle or the new one, never half."""
        directory = Path(directory)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "captioner_version": __version__,
            "encoder": self.encoder,
            "decoder": {k: v for k, v in self.model.get_config().items() if k not in ("name", "trainable", "dtype")},
            "vocab_size": len(self.vocab),
            "max_len": self.max_len,
            "decoding": self.decoding,
            "info": self.info,
        }
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            self.vocab.save(tmp / VOCAB)
            # A `.keras` file keeps a compiled model's optimizer state (3x the size) whatever
            # `include_optimizer` says, and a bundle is for inference: save an uncompiled twin.
            twin = type(self.model).from_config(self.model.get_config())
            twin.set_weights(self.model.get_weights())
            twin.save(tmp / DECODER)
        return directory


def load_bundle(directory: str | Path) -> Bundle:
    """Load and validate a bundle; any problem raises `BundleError` with a one-line reason."""
    directory = Path(directory)
    name = str(directory)
    if not directory.is_dir():
        raise BundleError(f"{name}: model bundle not found (expected a directory with {CONFIG})")
    config = _read_config(directory)
    for key in ("encoder", "vocab_size", "max_len"):
        if key not in config:
            raise BundleError(f"{name}: {CONFIG} has no '{key}'")
    encoder = config["encoder"]
    if not isinstance(encoder, dict) or not {"name", "weights_id", "image_size", "feature_dim"} <= encoder.keys():
        raise BundleError(f"{name}: {CONFIG} 'encoder' must give name, weights_id, image_size and feature_dim")
    try:
        vocab = Vocabulary.load(_member(directory, VOCAB))
    except ValueError as e:
        raise BundleError(f"{name}: {e}") from None
    try:
        DecodeOptions(max_len=int(config["max_len"]), **dict(config.get("decoding") or {}))
    except (TypeError, ValueError) as e:
        raise BundleError(f"{name}: {CONFIG} has invalid decoding settings ({e})") from None
    model = _load_decoder(_member(directory, DECODER))
    problems = []
    if len(vocab) != config["vocab_size"]:
        problems.append(f"vocabulary has {len(vocab)} words but config says {config['vocab_size']}")
    if model.vocab_size != len(vocab):
        problems.append(f"decoder predicts {model.vocab_size} words but the vocabulary has {len(vocab)}")
    if model.feature_dim != encoder["feature_dim"]:
        problems.append(
            f"decoder expects {model.feature_dim}-d features but encoder {encoder['name']} gives {encoder['feature_dim']}"
        )
    if problems:
        raise BundleError(f"{name}: inconsistent bundle: {'; '.join(problems)}")
    return Bundle(
        model=model,
        vocab=vocab,
        encoder=encoder,
        max_len=int(config["max_len"]),
        decoding=dict(config.get("decoding") or {}),
        info=dict(config.get("info") or {}),
    )


def _member(directory: Path, filename: str) -> Path:
    """`directory/filename`, refused if it is a symlink leading out of the bundle: a bundle
    only ever reads its own fixed file names, never a path taken from its config."""
    path = directory / filename
    if not path.resolve().is_relative_to(directory.resolve()):
        raise BundleError(f"{path}: points outside the bundle (to {path.resolve()}); refusing to read it")
    return path


def _read_config(directory: Path) -> dict[str, Any]:
    path = _member(directory, CONFIG)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{directory}: not a model bundle (no {CONFIG})") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: unreadable ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise BundleError(f"{path}: not a captioner bundle config")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{directory}: bundle format version {version} is not supported by captioner {__version__} "
            f"(expects {FORMAT_VERSION}); retrain it or use a matching captioner release"
        )
    return config


def _check_classes(node: Any, where: Path) -> None:
    """Refuse, before Keras reads it, a model file naming anything but Keras's own classes and
    the decoder and its loss: above all a Lambda layer, which would carry arbitrary code."""
    if isinstance(node, dict):
        cls, module = node.get("class_name"), str(node.get("module") or "")
        if isinstance(cls, str):
            if cls == "Lambda":
                raise BundleError(f"{where}: contains a Lambda layer (arbitrary code); refusing to load it")
            trusted = module == "keras" or module.startswith("keras.") or (
                module == "captioner.model" and cls in ("ShowAndTell", "MaskedCrossEntropy")
            )
            if not trusted:
                raise BundleError(f"{where}: refers to {module or '?'}.{cls}, which a captioner bundle never contains")
        for value in node.values():
            _check_classes(value, where)
    elif isinstance(node, list):
        for value in node:
            _check_classes(value, where)


def _load_decoder(path: Path) -> ShowAndTell:
    try:
        with zipfile.ZipFile(path) as archive:
            model_config = json.loads(archive.read("config.json"))
    except FileNotFoundError:
        raise BundleError(f"{path}: decoder file missing") from None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise BundleError(f"{path}: not a readable Keras model file ({e})") from None
    if model_config.get("class_name") != "ShowAndTell":
        raise BundleError(f"{path}: holds a {model_config.get('class_name')!r} model, not a ShowAndTell decoder")
    _check_classes(model_config, path)
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # noqa: BLE001 - Keras raises many types for bad files; all mean "refused"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"{path}: the decoder does not load ({reason[:300]})") from None
    if not isinstance(model, ShowAndTell):
        raise BundleError(f"{path}: not a ShowAndTell decoder")
    return model
