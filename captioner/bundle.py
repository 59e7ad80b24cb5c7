"""Model bundles: one directory holding config, vocabulary, decoder and runtime files, loaded with one call.

    <bundle>/config.json    format version, model type, encoder identity, decoder sizes, decoding defaults,
                            the SHA-256 of each runtime file
    <bundle>/vocab.json     the vocabulary (ids 0..3 are <pad> <start> <end> <unk>)
    <bundle>/decoder.keras  the Keras model file (architecture + weights), loaded in safe mode
    <bundle>/encoder.tflite, decoder.tflite   the same networks for the LiteRT runtime (optional)
    <bundle>/encoder.int8.tflite              the encoder quantised to int8 (optional, faster)
    <bundle>/familiarity.npy  training photos' features, to score how familiar a photo is (optional)

An ensemble bundle holds several such bundles of one encoder and vocabulary, whose decoders
caption together (`captioner.ensemble`):

    <ensemble>/config.json    format version, model type "ensemble", the member folders, the encoder
                              identity, decoding defaults
    <ensemble>/members/0 .. members/N-1   complete bundles, each loaded as any bundle; the encoder's
                              files and the familiarity data used are those of members/0

Bundles may come from strangers, so loading runs no code from them and allocates nothing a
config asks for before checking it: every field's type and range is checked, file sizes are
bounded before a byte is read, the model file may name only Keras layers and the decoder's own
class (never a `Lambda`), Keras loads it in `safe_mode`, no pickle is read, and the weights must
be finite. Runtime and familiarity files are read only by their fixed names and only if their
SHA-256 matches the config; the familiarity file is a plain NumPy array, read without pickle.
Every refusal is a `BundleError` with a one-line reason. This module imports neither TensorFlow
nor Keras until a Keras decoder is loaded or saved.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captioner import familiarity as familiarity_data
from captioner.decoding import DecodeOptions
from captioner.errors import first_line
from captioner.familiarity import Familiarity, FamiliarityError
from captioner.fileio import atomic_path, atomic_write_bytes, atomic_write_text
from captioner.text import SPECIAL_TOKENS, Vocabulary
from captioner.version import __version__

FORMAT = "captioner-bundle"
FORMAT_VERSION = 2  # 2: the decoding defaults hold max_len; version 1 bundles still load
CONFIG, VOCAB, DECODER = "config.json", "vocab.json", "decoder.keras"
LITERT_FILES = ("encoder.tflite", "decoder.tflite", "encoder.int8.tflite")  # the only runtime files a bundle may name

# The model families a bundle may hold: config name -> class name in captioner.model.
MODEL_TYPES: dict[str, str] = {"show-and-tell": "ShowAndTell", "show-attend-tell": "ShowAttendTell"}

# Sizes no real bundle comes near; beyond them a config is an attack or an accident.
MAX_CONFIG_BYTES = 1 << 20
MAX_VOCAB_BYTES = 16 << 20
MAX_VOCAB_WORDS = 200_000
MAX_DECODER_BYTES = 2 << 30  # also bounds each runtime file
MAX_JSON_DEPTH = 32
DECODER_LIMITS = {"vocab_size": MAX_VOCAB_WORDS, "feature_dim": 16_384, "embed_dim": 4096, "units": 4096,
                  "num_layers": 8}
# The sizes each model type has, of those above and its own (an attention model holds regions x
# attention_dim keys per beam: 4096 regions is a 64x64 map, larger than any encoder here gives).
TYPE_LIMITS = {
    "show-and-tell": DECODER_LIMITS,
    "show-attend-tell": {**{k: v for k, v in DECODER_LIMITS.items() if k != "num_layers"},
                         "regions": 4096, "attention_dim": 4096},
}
MAX_ATTENTION_LAMBDA = 100.0
# The decoder's own classes a model file may name, besides the decoder and its loss.
INNER_CLASSES = {"ShowAttendTell": ("AttentionLSTMCell",)}
ENCODER_FIELDS = {"name": str, "weights_id": str, "image_size": int, "feature_dim": int}
ENSEMBLE = "ensemble"  # an ensemble bundle's model type
MAX_MEMBERS = 8  # each member costs a decoder pass per word; more would only burn time and memory


class BundleError(ValueError):
    """A bundle that cannot be loaded; the message names the bundle and the reason."""


@dataclass
class Bundle:
    """Everything needed to caption with a trained decoder, apart from the encoder itself.

    `model` is the Keras decoder; None when the bundle was loaded for a runtime that does not
    need it (`load_bundle(..., load_decoder=False)`).
    """

    model: Any  # a captioner.model decoder (ShowAndTell, ShowAttendTell), or None
    vocab: Vocabulary
    encoder: dict  # ImageEncoder.describe(): name, weights_id, image_size, feature_dim
    decoding: DecodeOptions = DecodeOptions()  # the defaults captions are decoded with
    info: dict = field(default_factory=dict)  # training data, metrics, time: for people, not code
    model_type: str = "show-and-tell"
    decoder_sizes: dict = field(default_factory=dict)  # the decoder's config: vocab_size, units, ...
    litert: dict = field(default_factory=dict)  # runtime file name -> its SHA-256
    directory: Path | None = None  # where it was loaded from
    familiarity: Familiarity | None = None  # training photos' features, to score photos against
    members: tuple[Bundle, ...] = ()  # an ensemble's bundles (model type "ensemble"); () for one decoder

    @property
    def attends(self) -> bool:
        """Whether the decoder (or one of an ensemble's) attends: it reads spatial maps and gives
        attention weights."""
        return self.model_type == "show-attend-tell" or any(m.attends for m in self.members)

    @property
    def primary(self) -> Bundle:
        """The bundle whose encoder files and familiarity data serve this one: itself, or an
        ensemble's first member."""
        return self.members[0] if self.members else self

    @property
    def has_litert(self) -> bool:
        """Whether it has the files to run on LiteRT (an ensemble: every member has)."""
        return all(m.has_litert for m in self.members) if self.members else bool(self.litert)

    def refuse_ensemble(self, action: str) -> None:
        """A `BundleError` for an ensemble where one decoder is needed (`action` says for what)."""
        if self.members:
            raise BundleError(f"{self.directory}: an ensemble bundle; {action} its members (one model each) "
                              "and build the ensemble again with `captioner ensemble`")

    def __post_init__(self) -> None:
        if self.model is not None:
            self.decoder_sizes = _decoder_sizes(self.model.get_config())
            self.model_type = next(name for name, cls in MODEL_TYPES.items() if type(self.model).__name__ == cls)

    def save(self, directory: str | Path) -> Path:
        """Write the bundle atomically: readers see the old bundle or the new one, never half.
        (Its LiteRT files come after: `captioner.export_litert.add_litert_files`.)"""
        directory = Path(directory)
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            self.vocab.save(tmp / VOCAB)
            # A `.keras` file keeps a compiled model's optimizer state (3x the size) whatever
            # `include_optimizer` says, and a bundle is for inference: save an uncompiled twin.
            twin = type(self.model).from_config(self.model.get_config())
            twin.set_weights(self.model.get_weights())
            twin.save(tmp / DECODER)
            if self.familiarity is not None:
                atomic_write_bytes(tmp / familiarity_data.FILENAME, self.familiarity.file_bytes())
            write_config(tmp, self, {})
        self.litert = {}
        return directory


def write_config(directory: Path, bundle: Bundle, litert: dict) -> None:
    """The bundle's config.json, naming its runtime files by their SHA-256."""
    _write_config_json(directory, {
        "model_type": bundle.model_type,
        "encoder": bundle.encoder,
        "decoder": bundle.decoder_sizes,
        "vocab_size": len(bundle.vocab),
        "decoding": bundle.decoding.to_dict(),
        "litert": litert,
        "familiarity": bundle.familiarity.config() if bundle.familiarity is not None else None,
        "info": bundle.info,
    })


def _write_config_json(directory: Path, fields: dict) -> None:
    """`directory/config.json`: the format header, then `fields`."""
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "captioner_version": __version__, **fields}
    atomic_write_text(directory / CONFIG, json.dumps(config, indent=2, allow_nan=False) + "\n")


def load_bundle(directory: str | Path, load_decoder: bool = True) -> Bundle:
    """Load and validate a bundle (or an ensemble bundle, with its members); any problem raises
    `BundleError` with a one-line reason. Without `load_decoder` the Keras decoders are not read
    (nor Keras imported): for LiteRT."""
    directory = Path(directory)
    config = _read_config(directory)
    if isinstance(config, dict) and config.get("model_type") == ENSEMBLE:
        return _load_ensemble(directory, config, load_decoder)
    return _load_single(directory, config, load_decoder)


def _read_config(directory: Path) -> Any:
    if not directory.is_dir():
        raise BundleError(f"{directory}: model bundle not found (expected a directory with {CONFIG})")
    return _read_json(directory, CONFIG, MAX_CONFIG_BYTES)


def _load_single(directory: Path, raw_config: Any, load_decoder: bool, read_familiarity: bool = True) -> Bundle:
    config = _check_config(directory, raw_config)
    vocab = _read_vocab(directory)
    sizes, encoder = config["decoder"], config["encoder"]
    problems = []
    if len(vocab) != config["vocab_size"]:
        problems.append(f"vocabulary has {len(vocab)} words but config says {config['vocab_size']}")
    if sizes["vocab_size"] != len(vocab):
        problems.append(f"decoder predicts {sizes['vocab_size']} words but the vocabulary has {len(vocab)}")
    if sizes["feature_dim"] != encoder["feature_dim"]:
        problems.append(f"decoder expects {sizes['feature_dim']}-d features but encoder {encoder['name']} "
                        f"gives {encoder['feature_dim']}")
    model = None
    if not problems and load_decoder:
        model = _load_decoder(_member(directory, DECODER), config)
        if _decoder_sizes(model.get_config()) != sizes:
            problems.append(f"{DECODER} does not match the sizes in {CONFIG}")
    if problems:
        raise BundleError(f"{directory}: inconsistent bundle: {'; '.join(problems)}")
    familiarity = (_read_familiarity(directory, config["familiarity"], encoder["feature_dim"])
                   if read_familiarity else None)
    return Bundle(model=model, vocab=vocab, encoder=encoder, decoding=config["decoding"], info=config["info"],
                  model_type=config["model_type"], decoder_sizes=sizes, litert=config["litert"],
                  directory=directory, familiarity=familiarity)


def add_familiarity_file(bundle: Bundle, familiarity: Familiarity) -> None:
    """Put familiarity data into a loaded bundle's directory: the file first, config.json last."""
    atomic_write_bytes(bundle.directory / familiarity_data.FILENAME, familiarity.file_bytes())
    bundle.familiarity = familiarity
    write_config(bundle.directory, bundle, bundle.litert)


def save_ensemble(sources: Sequence[str | Path], output: str | Path) -> Bundle:
    """Build an ensemble bundle at `output` from 2 to `MAX_MEMBERS` bundles of one encoder and
    vocabulary (an attention model first, if any): each is copied into `output/members/i` (the
    files its config names), atomically; the decoding defaults are the first one's. Members that
    cannot caption together are refused, by name. Returns it loaded (without Keras decoders)."""
    if not 2 <= len(sources) <= MAX_MEMBERS:
        raise BundleError(f"an ensemble takes 2 to {MAX_MEMBERS} models, got {len(sources)}")
    members = []
    for source in map(Path, sources):
        config = _read_config(source)
        if isinstance(config, dict) and config.get("model_type") == ENSEMBLE:
            raise BundleError(f"{source}: an ensemble itself; give its members instead")
        members.append(_load_single(source, config, load_decoder=False))
    _check_members(members, [str(s) for s in sources], members[0].encoder)
    names = _member_names(len(members))
    output = Path(output)
    with atomic_path(output) as tmp:
        for bundle, name in zip(members, names):
            (tmp / name).mkdir(parents=True)
            for filename in _bundle_files(bundle):
                path = _member(bundle.directory, filename)
                try:
                    shutil.copyfile(path, tmp / name / filename)
                except OSError as e:
                    raise BundleError(f"{path}: unreadable ({e.strerror or e})") from None
        _write_config_json(tmp, {"model_type": ENSEMBLE, "members": names, "encoder": members[0].encoder,
                                 "decoding": members[0].decoding.to_dict(), "info": {}})
    return load_bundle(output, load_decoder=False)


def _member_names(count: int) -> list[str]:
    """An ensemble's member folders: fixed names, so a config never chooses a path."""
    return [f"members/{i}" for i in range(count)]


def _bundle_files(bundle: Bundle) -> list[str]:
    """The files a loaded bundle of one decoder consists of."""
    extra = [familiarity_data.FILENAME] if bundle.familiarity is not None else []
    return [CONFIG, VOCAB, DECODER, *bundle.litert, *extra]


def _load_ensemble(directory: Path, config: dict, load_decoder: bool) -> Bundle:
    where = directory / CONFIG
    if _check_format(directory, config) != FORMAT_VERSION:
        raise BundleError(f"{where}: an ensemble's 'format_version' must be {FORMAT_VERSION}")
    names = config.get("members")
    if not isinstance(names, list) or not 2 <= len(names) <= MAX_MEMBERS or names != _member_names(len(names)):
        raise BundleError(f"{where}: 'members' must list 2 to {MAX_MEMBERS} folders named members/0, members/1, "
                          f"... in order, got {names!r:.100}")
    encoder, decoding, info = _check_shared(where, config)
    members = []
    for i, name in enumerate(names):
        path = _member(directory, name)
        # Only the first member's familiarity data is used: the others' (up to 256 MiB each) stay unread.
        members.append(_load_single(path, _read_config(path), load_decoder, read_familiarity=i == 0))
    _check_members(members, [str(m.directory) for m in members], encoder)
    first = members[0]
    return Bundle(model=None, vocab=first.vocab, encoder=encoder, decoding=decoding, info=info, model_type=ENSEMBLE,
                  directory=directory, familiarity=first.familiarity, members=tuple(members))


def _check_members(members: Sequence[Bundle], names: Sequence[str], encoder: dict) -> None:
    """Refuse, naming it, the first member that cannot caption with the first one on `encoder`."""
    first = members[0]
    for bundle, name in zip(members, names):
        if bundle.encoder != encoder:
            raise BundleError(f"{name}: trained on encoder {bundle.encoder['name']} "
                              f"({bundle.encoder['weights_id'][:20]}), not the ensemble's {encoder['name']} "
                              f"({encoder['weights_id'][:20]}); members must share one encoder")
        if bundle.vocab != first.vocab:
            raise BundleError(f"{name}: its vocabulary ({len(bundle.vocab):,} words) is not {names[0]}'s "
                              f"({len(first.vocab):,} words); members must share one vocabulary")
        if bundle.attends and not first.attends:
            raise BundleError(f"{name}: an attention model must come first (the first member's encoder files "
                              f"give what the ensemble reads, and {names[0]} has no attention)")
        if bundle.attends and bundle.decoder_sizes["regions"] != first.decoder_sizes["regions"]:
            raise BundleError(f"{name}: attends over {bundle.decoder_sizes['regions']} regions, "
                              f"{names[0]} over {first.decoder_sizes['regions']}")


def _read_familiarity(directory: Path, entry: dict | None, feature_dim: int) -> Familiarity | None:
    if entry is None:
        return None
    path = _member(directory, familiarity_data.FILENAME)
    try:
        if not path.is_file():
            raise BundleError(f"{path}: missing, or not a regular file, though {CONFIG} names it")
        if path.stat().st_size > familiarity_data.MAX_BYTES:
            raise BundleError(f"{path}: larger than any familiarity data ({familiarity_data.MAX_BYTES:,} bytes)")
        return familiarity_data.load(path.read_bytes(), entry, feature_dim)
    except OSError as e:
        raise BundleError(f"{path}: unreadable ({e.strerror or e})") from None
    except FamiliarityError as e:
        raise BundleError(f"{path}: {e}") from None


def read_runtime_file(bundle: Bundle, filename: str) -> bytes:
    """A runtime file of a loaded bundle, refused unless its SHA-256 is the one its config names."""
    if bundle.directory is None or filename not in bundle.litert:
        raise BundleError(f"{bundle.directory}: the bundle has no {filename} (add it with `captioner export`)")
    path = _member(bundle.directory, filename)
    try:
        if path.stat().st_size > MAX_DECODER_BYTES:
            raise BundleError(f"{path}: larger than any model file ({MAX_DECODER_BYTES:,} bytes)")
        data = path.read_bytes()
    except OSError as e:
        raise BundleError(f"{path}: unreadable ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != bundle.litert[filename]:
        raise BundleError(f"{path}: does not match the SHA-256 in {CONFIG} (replaced or damaged); "
                          "re-create it with `captioner export`")
    return data


def _decoder_sizes(model_config: dict) -> dict:
    return {k: v for k, v in model_config.items() if k not in ("name", "trainable", "dtype")}


def _check_sizes(sizes: Any, where: Path | str, what: str, model_type: str) -> None:
    if not isinstance(sizes, dict):
        raise BundleError(f"{where}: the {what} config must be an object")
    for name, high in TYPE_LIMITS[model_type].items():
        if not _whole(sizes.get(name), 1, high):
            raise BundleError(f"{where}: {what} '{name}' must be a whole number from 1 to {high:,}, "
                              f"got {sizes.get(name)!r}")
    dropout = sizes.get("dropout", 0.0)
    if not _number(dropout, 0, 1) or dropout == 1:
        raise BundleError(f"{where}: {what} 'dropout' must be a number from 0 to 1, got {dropout!r}")
    weight = sizes.get("attention_lambda", 0.0)
    if not _number(weight, 0, MAX_ATTENTION_LAMBDA):
        raise BundleError(f"{where}: {what} 'attention_lambda' must be a number from 0 to {MAX_ATTENTION_LAMBDA:g}, "
                          f"got {weight!r}")


def _member(directory: Path, filename: str) -> Path:
    """`directory/filename`, refused if it is a symlink leading out of the bundle: a bundle
    only ever reads its own fixed file names, never a path taken from its config."""
    path = directory / filename
    try:
        inside = path.resolve().is_relative_to(directory.resolve())
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a symlink loop
        raise BundleError(f"{path}: a symlink loop or an unreadable link; refusing to read it") from None
    if not inside:
        raise BundleError(f"{path}: points outside the bundle; refusing to read it")
    return path


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a valid JSON number")


def _parse_json(data: bytes, where: Path | str) -> Any:
    """Strict JSON: no NaN/Infinity, nesting bounded (deep nesting would crash the parser)."""
    try:
        value = json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise BundleError(f"{where}: not valid JSON ({first_line(e)[:200]})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise BundleError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _depth(value: Any, level: int = 1) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return max((_depth(child, level + 1) for child in children), default=level)


def _read_json(directory: Path, filename: str, max_bytes: int) -> Any:
    path = _member(directory, filename)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise BundleError(f"{path}: not a regular file")
        if size > max_bytes:
            raise BundleError(f"{path}: {size:,} bytes, more than a bundle's {filename} ever needs ({max_bytes:,})")
        data = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{directory}: not a model bundle (no {filename})") from None
    except OSError as e:
        raise BundleError(f"{path}: unreadable ({e.strerror or e})") from None
    return _parse_json(data, path)


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_config(directory: Path, config: Any) -> dict:
    """The config with every field checked and `decoding` as `DecodeOptions`."""
    where = directory / CONFIG
    if _check_format(directory, config) == 1:  # max_len sat beside the decoding defaults; the model type was implied
        config = {**config, "model_type": "show-and-tell", "litert": {},
                  "decoding": {**(config.get("decoding") or {}), "max_len": config.get("max_len")}}
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise BundleError(f"{where}: 'model_type' must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    encoder, decoding, info = _check_shared(where, config)
    if not _whole(config.get("vocab_size"), len(SPECIAL_TOKENS), MAX_VOCAB_WORDS):
        raise BundleError(f"{where}: 'vocab_size' must be a whole number from 4 to {MAX_VOCAB_WORDS:,}, "
                          f"got {config.get('vocab_size')!r}")
    _check_sizes(config.get("decoder"), where, "decoder", model_type)
    litert = config.get("litert", {})
    if (not isinstance(litert, dict) or not set(litert) <= set(LITERT_FILES)
            or not all(isinstance(v, str) and len(v) == 64 for v in litert.values())):
        raise BundleError(f"{where}: 'litert' must map some of {', '.join(LITERT_FILES)} to their SHA-256")
    familiarity = config.get("familiarity")
    if familiarity is not None:
        _check_familiarity(familiarity, where)
    return {**config, "encoder": encoder, "decoding": decoding, "info": info, "litert": litert,
            "familiarity": familiarity}


def _check_format(directory: Path, config: Any) -> int:
    """The config's format version, refused unless it is a captioner bundle's this release reads."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise BundleError(f"{directory / CONFIG}: not a captioner bundle config")
    version = config.get("format_version")
    if version not in (1, FORMAT_VERSION) or isinstance(version, bool):
        raise BundleError(
            f"{directory}: bundle format version {version!r} is not supported by captioner {__version__} "
            f"(expects {FORMAT_VERSION}); retrain it or use a matching captioner release"
        )
    return version


def _check_shared(where: Path, config: dict) -> tuple[dict, DecodeOptions, dict]:
    """The fields of every bundle config, an ensemble's too: encoder identity, decoding defaults, info."""
    encoder = config.get("encoder")
    if not isinstance(encoder, dict) or any(not isinstance(encoder.get(k), t) or isinstance(encoder.get(k), bool)
                                            for k, t in ENCODER_FIELDS.items()):
        raise BundleError(f"{where}: 'encoder' must give name, weights_id, image_size and feature_dim (text, text, number, number)")
    if not _whole(encoder["image_size"], 1, 4096) or not _whole(encoder["feature_dim"], 1, DECODER_LIMITS["feature_dim"]):
        raise BundleError(f"{where}: 'encoder' sizes out of range ({encoder['image_size']}, {encoder['feature_dim']})")
    if not isinstance(config.get("info", {}), dict):
        raise BundleError(f"{where}: 'info' must be an object, got {type(config['info']).__name__}")
    try:
        decoding = DecodeOptions.from_dict(config.get("decoding"))
    except (TypeError, ValueError) as e:
        raise BundleError(f"{where}: invalid decoding default {first_line(e)}") from None
    return encoder, decoding, config.get("info", {})


def _check_familiarity(entry: Any, where: Path) -> None:
    """The config's `familiarity` entry: the file's SHA-256, the threshold and how it was calibrated."""
    if not isinstance(entry, dict):
        raise BundleError(f"{where}: 'familiarity' must be an object or null")
    sha256, threshold, dev_pass = entry.get("sha256"), entry.get("threshold"), entry.get("dev_pass")
    neighbours, dev_photos = entry.get("neighbours"), entry.get("dev_photos")
    if not (isinstance(sha256, str) and len(sha256) == 64):
        raise BundleError(f"{where}: familiarity 'sha256' must be 64 hex digits, got {sha256!r:.80}")
    if not _number(threshold, -1, 1):
        raise BundleError(f"{where}: familiarity 'threshold' must be a number from -1 to 1, got {threshold!r}")
    if not _number(dev_pass, 0, 1) or dev_pass == 0:
        raise BundleError(f"{where}: familiarity 'dev_pass' must be a number above 0 and at most 1, got {dev_pass!r}")
    if not _whole(neighbours, 1, familiarity_data.MAX_REFERENCE):
        raise BundleError(f"{where}: familiarity 'neighbours' must be a whole number from 1 to "
                          f"{familiarity_data.MAX_REFERENCE:,}, got {neighbours!r}")
    if not _whole(dev_photos, 1, 10**9):
        raise BundleError(f"{where}: familiarity 'dev_photos' must be a positive whole number, got {dev_photos!r}")


def _number(value: Any, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _read_vocab(directory: Path) -> Vocabulary:
    path = _member(directory, VOCAB)
    data = _read_json(directory, VOCAB, MAX_VOCAB_BYTES)
    try:
        return Vocabulary.from_json(data)
    except ValueError as e:
        raise BundleError(f"{path}: not a valid vocabulary ({first_line(e)})") from None


def _check_classes(node: Any, where: Path, allowed: str) -> None:
    """Refuse, before Keras reads it, a model file naming anything but Keras's own classes and
    the decoder and its loss: above all a Lambda layer, which would carry arbitrary code."""
    if isinstance(node, dict):
        cls, module = node.get("class_name"), str(node.get("module") or "")
        if isinstance(cls, str):
            if cls == "Lambda":
                raise BundleError(f"{where}: contains a Lambda layer (arbitrary code); refusing to load it")
            trusted = module == "keras" or module.startswith("keras.") or (
                module == "captioner.model" and cls in (allowed, "MaskedCrossEntropy", *INNER_CLASSES.get(allowed, ()))
            )
            if not trusted:
                raise BundleError(f"{where}: refers to {module or '?'}.{cls}, which a captioner bundle never contains")
        for value in node.values():
            _check_classes(value, where, allowed)
    elif isinstance(node, list):
        for value in node:
            _check_classes(value, where, allowed)


def _check_decoder_config(model_config: Any, path: Path, class_name: str, model_type: str) -> None:
    if not isinstance(model_config, dict) or model_config.get("class_name") != class_name:
        found = model_config.get("class_name") if isinstance(model_config, dict) else type(model_config).__name__
        raise BundleError(f"{path}: holds a {found!r} model, not a {class_name} decoder")
    _check_classes(model_config, path, class_name)
    _check_sizes(model_config.get("config"), path, "decoder", model_type)


def _load_decoder(path: Path, config: dict):
    from captioner import model as models
    from captioner.quiet_tensorflow import keras

    model_cls = getattr(models, MODEL_TYPES[config["model_type"]])
    try:
        if path.stat().st_size > MAX_DECODER_BYTES:
            raise BundleError(f"{path}: larger than any decoder ({MAX_DECODER_BYTES:,} bytes)")
        with zipfile.ZipFile(path) as archive:
            # The sizes a zip declares bound what reading it can unpack.
            unpacked = sum(info.file_size for info in archive.infolist())
            if unpacked > MAX_DECODER_BYTES or archive.getinfo("config.json").file_size > MAX_CONFIG_BYTES:
                raise BundleError(f"{path}: unpacks to {unpacked:,} bytes, more than any decoder")
            model_config = _parse_json(archive.read("config.json"), f"{path}:config.json")
    except FileNotFoundError:
        raise BundleError(f"{path}: decoder file missing") from None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError(f"{path}: not a readable Keras model file ({first_line(e)})") from None
    _check_decoder_config(model_config, path, model_cls.__name__, config["model_type"])
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # noqa: BLE001 - Keras raises many types for bad files; all mean "refused"
        raise BundleError(f"{path}: the decoder does not load ({first_line(e)[:300]})") from None
    if not isinstance(model, model_cls):
        raise BundleError(f"{path}: not a {model_cls.__name__} decoder")
    if not all(np.isfinite(w).all() for w in model.get_weights()):
        raise BundleError(f"{path}: the decoder's weights are not all finite numbers (NaN or infinity)")
    return model

