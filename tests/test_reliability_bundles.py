"""Untrusted model bundles (issue 7, item 3): loading runs no code from the bundle and refuses,
with a one-line message naming the problem, anything inconsistent or foreign.

Complements tests/test_bundle.py (round trip, format version 99, vocabulary/feature-size
mismatches, a Lambda in the config, foreign classes, corrupt and mis-shaped decoders).
"""
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import StubEncoder, edit_config, edit_decoder_file

import captioner
from captioner.bundle import CONFIG, DECODER, VOCAB, Bundle, BundleError, load_bundle
from captioner.captioner import Captioner
from captioner.decoding import DecodeOptions
from captioner.encoder import ImageEncoder
from captioner.model import ShowAndTell
from captioner.quiet_tensorflow import keras
from captioner.text import Vocabulary

VOCAB_WORDS = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "red", "circle"])
ENCODER = {"name": "tiny", "weights_id": "random:seed=0", "image_size": 64, "feature_dim": 8}
PACKAGE = Path(captioner.__file__).parent


@pytest.fixture
def bundle_dir(tmp_path):
    model = ShowAndTell(len(VOCAB_WORDS), 8, embed_dim=4, units=6)
    return Bundle(model, VOCAB_WORDS, ENCODER, DecodeOptions(max_len=12)).save(tmp_path / "bundle")


def refused(path: Path, pattern: str) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    message = str(info.value)
    assert re.search(pattern, message), message
    assert "\n" not in message
    return message


def test_keras_is_asked_for_safe_mode(bundle_dir, monkeypatch):
    calls = []
    real = keras.saving.load_model
    monkeypatch.setattr(keras.saving, "load_model", lambda *a, **k: calls.append(k) or real(*a, **k))
    load_bundle(bundle_dir)
    assert calls == [{"compile": False, "safe_mode": True}]


def test_a_lambda_never_runs(bundle_dir, tmp_path):
    marker = tmp_path / "code-ran"
    # a real serialised Lambda whose code would create `marker`
    layer = keras.layers.Lambda(lambda x, p=str(marker): (__import__("pathlib").Path(p).touch(), x)[1])
    evil = keras.saving.serialize_keras_object(layer)
    edit_decoder_file(bundle_dir, lambda c: c["config"].setdefault("layers", [evil]))
    refused(bundle_dir, "Lambda layer")
    assert not marker.exists()


def test_serialised_python_function_is_refused(bundle_dir):
    # a lambda can also hide as an activation or a loss, without any Lambda layer
    code = {"class_name": "__lambda__", "config": {"code": "4wIAAAA=", "defaults": None, "closure": None}}
    edit_decoder_file(bundle_dir, lambda c: c["config"].update(activation=code))
    refused(bundle_dir, r"refers to \?\.__lambda__")


def test_a_whole_keras_model_with_a_lambda_is_refused(bundle_dir, tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    model.save(tmp_path / "other.keras")
    (tmp_path / "other.keras").replace(bundle_dir / DECODER)
    refused(bundle_dir, "not a ShowAndTell decoder")


def test_no_pickle_in_the_package_or_its_bundles(bundle_dir):
    sources = {p: p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py")}
    for path, text in sources.items():
        for pattern in (r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib|cloudpickle)\b", r"allow_pickle\s*=\s*True",
                        r"safe_mode\s*=\s*False", r"torch\.load\(", r"\beval\(", r"\bexec\("):
            assert not re.search(pattern, text, re.MULTILINE), f"{path}: {pattern}"
    # every np.load refuses pickles explicitly
    for path, text in sources.items():
        for line in text.splitlines():
            if "np.load(" in line:
                assert "allow_pickle=False" in line, f"{path}: {line.strip()}"
    assert sorted(p.name for p in bundle_dir.iterdir()) == sorted([CONFIG, VOCAB, DECODER])
    with zipfile.ZipFile(bundle_dir / DECODER) as z:
        assert sorted(z.namelist()) == ["config.json", "metadata.json", "model.weights.h5"]


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"format_version": None}, "format version None is not supported"),
        ({"format_version": "1"}, "format version '1' is not supported"),
        ({"format_version": True}, "format version True is not supported"),
        ({"format_version": 0}, r"format version 0 is not supported .*\(expects 2\)"),
        ({"format": "something-else"}, "not a captioner bundle config"),
    ],
)
def test_format_and_version_checks(bundle_dir, change, pattern):
    edit_config(bundle_dir, **change)
    refused(bundle_dir, pattern)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", "", '{"format": "captioner-bundle", "format_ver'])
def test_unreadable_or_half_written_config(bundle_dir, text):
    (bundle_dir / CONFIG).write_text(text)
    refused(bundle_dir, "config.json")


@pytest.mark.parametrize(
    "words, pattern",
    [
        (["a", "b"], "vocabulary must start with"),
        (["<pad>", "<start>", "<end>", "<unk>", "a", "a"], "duplicate words"),
        ({"words": "abc"}, "must be a list of non-empty strings"),
    ],
)
def test_bad_vocabulary_files(bundle_dir, words, pattern):
    data = words if isinstance(words, dict) else {"words": words}
    (bundle_dir / VOCAB).write_text(json.dumps(data))
    refused(bundle_dir, pattern)


def test_decoder_trained_on_another_vocabulary(bundle_dir):
    # vocabulary and config agree with each other, but not with the decoder's output layer
    bigger = Vocabulary([*VOCAB_WORDS.words, "blue", "square"])
    bigger.save(bundle_dir / VOCAB)
    edit_config(bundle_dir, vocab_size=len(bigger))
    refused(bundle_dir, "decoder predicts 7 words but the vocabulary has 9")


def test_decoder_for_another_backbone(bundle_dir):
    edit_config(bundle_dir, encoder={"name": "efficientnet-lite0", "weights_id": "x", "image_size": 224,
                                     "feature_dim": 1280})
    refused(bundle_dir, "decoder expects 8-d features but encoder efficientnet-lite0 gives 1280")


@pytest.mark.parametrize("encoder", [{"name": "tiny"}, "tiny", None])
def test_encoder_identity_must_be_complete(bundle_dir, encoder):
    edit_config(bundle_dir, encoder=encoder)
    refused(bundle_dir, "'encoder' must give name, weights_id, image_size and feature_dim")


@pytest.mark.parametrize(
    "change",
    [{"method": "beam", "run": "rm -rf ~"}, {"method": "telepathy"}, {"beam_size": 0}, "beam",
     {"max_len": "long"}, {"max_len": 0}, {"max_len": 10**9}, {"beam_size": 300_000},
     {"length_penalty": "0.5"}, {"seed": 1.5}, {"temperature": None}, [1, 2]],
)
def test_bad_decoding_defaults_are_refused_at_load(bundle_dir, change):
    # otherwise the first caption request would fail far from the cause, or run out of memory
    edit_config(bundle_dir, decoding={**DecodeOptions().to_dict(), **change} if isinstance(change, dict) else change)
    refused(bundle_dir, "invalid decoding default")


def test_config_cannot_name_files_to_read(bundle_dir, tmp_path):
    """A bundle reads exactly config.json, vocab.json and decoder.keras from its own folder:
    the config holds no paths, and path-like entries a tampered config adds are ignored."""
    outside = tmp_path / "outside"
    outside.mkdir()
    other = ShowAndTell(len(VOCAB_WORDS), 8, embed_dim=4, units=9)
    other.save(outside / "evil.keras")
    (outside / "vocab.json").write_text(json.dumps({"words": ["<pad>", "<start>", "<end>", "<unk>", "x"]}))
    edit_config(bundle_dir, vocab="../outside/vocab.json", vocab_path=str(outside / "vocab.json"),
                decoder_path="../outside/evil.keras", weights=str(outside / "evil.keras"),
                model_file="/etc/passwd")
    bundle = load_bundle(bundle_dir)
    assert bundle.vocab == VOCAB_WORDS and bundle.model.units == 6


@pytest.mark.parametrize("member", [VOCAB, DECODER, CONFIG])
def test_member_files_cannot_link_outside_the_bundle(bundle_dir, tmp_path, member):
    outside = tmp_path / "elsewhere" / member
    outside.parent.mkdir()
    (bundle_dir / member).replace(outside)  # the same, valid content: only where it lives is wrong
    (bundle_dir / member).symlink_to(outside)
    refused(bundle_dir, f"{member}: points outside the bundle")


def test_links_inside_the_bundle_and_a_linked_bundle_are_fine(bundle_dir, tmp_path):
    (bundle_dir / DECODER).replace(bundle_dir / "weights.keras")
    (bundle_dir / DECODER).symlink_to("weights.keras")
    (tmp_path / "alias").symlink_to(bundle_dir)
    assert load_bundle(tmp_path / "alias").vocab == VOCAB_WORDS


@pytest.mark.parametrize("identity", [{"name": "mobilenetv2"}, {"weights_id": "random:seed=1"}])
def test_captioner_refuses_another_encoder(bundle_dir, identity):
    with pytest.raises(BundleError, match="model was trained on encoder tiny .* but got"):
        Captioner(load_bundle(bundle_dir), StubEncoder({**ENCODER, **identity}))


def test_captioner_refuses_a_real_encoder_with_other_weights(trained_run):
    with pytest.raises(BundleError, match="captions would be nonsense"):
        Captioner(trained_run[1], ImageEncoder("tiny", seed=1))


def test_captioner_refuses_an_encoder_of_another_feature_size(bundle_dir):
    # the bundle is consistent with itself (8-d decoder, config says 8) but the real tiny encoder
    # gives 32-d features: refuse at load rather than fail in the first caption request
    with pytest.raises(BundleError, match="feature"):
        Captioner.load(bundle_dir)


def test_unknown_encoder_name_is_a_clear_error(bundle_dir):
    edit_config(bundle_dir, encoder={**ENCODER, "name": "resnet-9000"})
    with pytest.raises(ValueError, match="resnet-9000") as info:
        Captioner.load(bundle_dir)
    assert "\n" not in str(info.value)


def test_captioner_load_gives_bundle_errors(tmp_path, bundle_dir):
    with pytest.raises(BundleError, match="model bundle not found"):
        Captioner.load(tmp_path / "nowhere")
    edit_config(bundle_dir, format_version=3)
    with pytest.raises(BundleError, match="format version 3"):
        Captioner.load(bundle_dir)



# ----------------------------------------------------------------------------- hostile sizes and types


@pytest.mark.parametrize("field, value", [
    ("vocab_size", 10**9), ("vocab_size", "7"), ("info", "training notes"), ("info", [1]),
    ("model_type", "show-attend-and-steal"), ("encoder", {**ENCODER, "feature_dim": 10**9}),
    ("encoder", {**ENCODER, "image_size": True}),
])
def test_config_fields_of_the_wrong_type_or_size_are_refused(bundle_dir, field, value):
    edit_config(bundle_dir, **{field: value})
    refused(bundle_dir, field)


@pytest.mark.parametrize("key, value", [("units", 10**9), ("num_layers", 5000), ("vocab_size", 2**40),
                                        ("embed_dim", "big"), ("dropout", 7), ("feature_dim", None)])
def test_decoder_sizes_are_bounded_before_anything_is_built(bundle_dir, key, value, monkeypatch):
    monkeypatch.setattr(keras.saving, "load_model", lambda *a, **k: pytest.fail("Keras was asked to build it"))
    edit_decoder_file(bundle_dir, lambda c: c["config"].update({key: value}))
    refused(bundle_dir, f"decoder '{key}' must be")


def test_a_decoder_config_that_is_a_list_is_refused(bundle_dir):
    edit_decoder_file(bundle_dir, replace_members={"config.json": b"[1, 2, 3]"})
    refused(bundle_dir, "holds a 'list' model, not a ShowAndTell decoder")


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 40 + "1" + "}" * 40,
                                  '{"format": "captioner-bundle", "vocab_size": Infinity}', '{"x": NaN}'])
def test_hostile_json_is_a_one_line_refusal(bundle_dir, text):
    (bundle_dir / CONFIG).write_text(text)
    refused(bundle_dir, f"{CONFIG}: (not valid JSON|JSON nested more than)")


def test_member_sizes_are_bounded_before_reading(bundle_dir, monkeypatch):
    from pathlib import Path as _Path

    big = bundle_dir / VOCAB
    with open(big, "r+b") as f:  # a sparse 350 MB vocab.json: refused from its size alone
        f.truncate(350 << 20)
    reads = []
    real = _Path.read_bytes
    monkeypatch.setattr(_Path, "read_bytes", lambda self: reads.append(self.name) or real(self))
    refused(bundle_dir, "vocab.json: .* bytes, more than a bundle's vocab.json ever needs")
    assert VOCAB not in reads


def test_a_zip_member_that_unpacks_to_gigabytes_is_refused(bundle_dir):
    import zipfile as _zip

    with _zip.ZipFile(bundle_dir / DECODER, "a", compression=_zip.ZIP_DEFLATED) as z:
        with z.open("padding.bin", "w", force_zip64=True) as member:
            chunk = bytes(1 << 24)
            for _ in range(130):  # 2.2 GB of zeros, a few MB on disk
                member.write(chunk)
    refused(bundle_dir, "unpacks to .* bytes, more than any decoder")


def test_non_finite_weights_are_refused(bundle_dir, tmp_path):
    bundle = load_bundle(bundle_dir)
    weights = bundle.model.get_weights()
    weights[0] = np.full_like(weights[0], np.nan)
    bundle.model.set_weights(weights)
    bundle.save(bundle_dir)
    refused(bundle_dir, "not all finite numbers")


def test_version_1_bundles_still_load(bundle_dir):
    config = json.loads((bundle_dir / CONFIG).read_text())
    decoding = config.pop("decoding")
    config.pop("model_type")
    config.update(format_version=1, max_len=decoding.pop("max_len"),
                  decoding={k: decoding[k] for k in ("method", "beam_size", "length_penalty")})
    (bundle_dir / CONFIG).write_text(json.dumps(config))
    assert load_bundle(bundle_dir).decoding == DecodeOptions(max_len=12)
