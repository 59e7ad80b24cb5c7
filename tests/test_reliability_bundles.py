"""Untrusted model bundles (issue 7, item 3): loading runs no code from the bundle and refuses,
with a one-line message naming the problem, anything inconsistent or foreign.

Complements tests/test_bundle.py (round trip, format version 99, vocabulary/feature-size
mismatches, a Lambda in the config, foreign classes, corrupt and mis-shaped decoders).
"""
import json
import re
import zipfile
from pathlib import Path

import keras
import pytest

import captioner
from captioner.bundle import CONFIG, DECODER, VOCAB, Bundle, BundleError, load_bundle
from captioner.captioner import Captioner
from captioner.encoder import ImageEncoder
from captioner.model import ShowAndTell
from captioner.text import Vocabulary

VOCAB_WORDS = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "red", "circle"])
ENCODER = {"name": "tiny", "weights_id": "random:seed=0", "image_size": 64, "feature_dim": 8}
PACKAGE = Path(captioner.__file__).parent


@pytest.fixture
def bundle_dir(tmp_path):
    model = ShowAndTell(len(VOCAB_WORDS), 8, embed_dim=4, units=6)
    return Bundle(model, VOCAB_WORDS, ENCODER, max_len=12).save(tmp_path / "bundle")


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / CONFIG).read_text())
    config.update(changes)
    (path / CONFIG).write_text(json.dumps(config))


def edit_decoder_config(path: Path, edit) -> None:
    """Rewrite the architecture JSON inside decoder.keras, as a tampered download would."""
    with zipfile.ZipFile(path / DECODER) as z:
        files = {n: z.read(n) for n in z.namelist()}
    config = json.loads(files["config.json"])
    edit(config)
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path / DECODER, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


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
    edit_decoder_config(bundle_dir, lambda c: c["config"].setdefault("layers", [evil]))
    refused(bundle_dir, "Lambda layer")
    assert not marker.exists()


def test_serialised_python_function_is_refused(bundle_dir):
    # a lambda can also hide as an activation or a loss, without any Lambda layer
    code = {"class_name": "__lambda__", "config": {"code": "4wIAAAA=", "defaults": None, "closure": None}}
    edit_decoder_config(bundle_dir, lambda c: c["config"].update(activation=code))
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
        ({"format_version": "1"}, "format version 1 is not supported"),
        ({"format_version": 0}, r"format version 0 is not supported .*\(expects 1\)"),
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
        ({"words": "abc"}, "must be a list of strings"),
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
    [{"decoding": {"method": "beam", "run": "rm -rf ~"}}, {"decoding": {"method": "telepathy"}},
     {"decoding": {"beam_size": 0}}, {"decoding": "beam"}, {"max_len": "long"}, {"max_len": 0}],
)
def test_bad_decoding_defaults_are_refused_at_load(bundle_dir, change):
    # otherwise the first caption request would fail with a TypeError far from the cause
    edit_config(bundle_dir, **change)
    refused(bundle_dir, "(invalid decoding settings|max_len)")


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


class _StubEncoder:
    """Looks like an ImageEncoder to `Captioner`; only its identity matters here."""

    def __init__(self, **identity):
        self.identity = {**ENCODER, **identity}

    def describe(self):
        return self.identity


@pytest.mark.parametrize("identity", [{"name": "mobilenetv2"}, {"weights_id": "random:seed=1"}])
def test_captioner_refuses_another_encoder(bundle_dir, identity):
    with pytest.raises(BundleError, match="model was trained on encoder tiny .* but got"):
        Captioner(load_bundle(bundle_dir), _StubEncoder(**identity))


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
    edit_config(bundle_dir, format_version=2)
    with pytest.raises(BundleError, match="format version 2"):
        Captioner.load(bundle_dir)

