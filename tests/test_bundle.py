import zipfile

import numpy as np
import pytest
from helpers import edit_config, edit_decoder_file

from captioner.bundle import Bundle, BundleError, load_bundle
from captioner.decoding import DecodeOptions
from captioner.model import ShowAndTell
from captioner.text import Vocabulary

VOCAB = Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "a", "red", "circle"])
ENCODER = {"name": "tiny", "weights_id": "random:seed=0", "image_size": 64, "feature_dim": 8}


@pytest.fixture
def model():
    return ShowAndTell(len(VOCAB), 8, embed_dim=4, units=6)


@pytest.fixture
def bundle_dir(tmp_path, model):
    return Bundle(model, VOCAB, ENCODER, DecodeOptions(max_len=12), info={"note": "test"}).save(tmp_path / "b")


def test_round_trip_is_identical(bundle_dir, model):
    loaded = load_bundle(bundle_dir)
    f, t = np.ones((1, 8), np.float32), np.array([[1, 4, 5]])
    np.testing.assert_array_equal(loaded.model((f, t)), model((f, t)))
    assert loaded.vocab == VOCAB and loaded.encoder == ENCODER and loaded.decoding == DecodeOptions(max_len=12)
    assert loaded.info == {"note": "test"}


def test_a_trained_model_is_saved_without_its_optimizer_state(tmp_path, model):
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit((np.ones((2, 8), np.float32), np.array([[1, 4], [1, 5]])), np.array([[4, 2], [5, 2]]), verbose=0)
    path = Bundle(model, VOCAB, ENCODER).save(tmp_path / "trained")
    with zipfile.ZipFile(path / "decoder.keras") as z:
        assert "optimizer" not in z.read("model.weights.h5").decode("latin-1")
    np.testing.assert_array_equal(load_bundle(path).model.get_weights()[0], model.get_weights()[0])


def test_saving_over_a_bundle_replaces_it_whole(bundle_dir):
    model = ShowAndTell(len(VOCAB), 8, embed_dim=4, units=6)
    Bundle(model, VOCAB, ENCODER, DecodeOptions(max_len=20)).save(bundle_dir)
    assert load_bundle(bundle_dir).decoding.max_len == 20
    assert sorted(p.name for p in bundle_dir.parent.iterdir()) == ["b"]  # no temporary left over


def test_missing_and_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="no config.json"):
        load_bundle(tmp_path)


def test_format_version_mismatch(bundle_dir):
    edit_config(bundle_dir, format_version=99)
    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(bundle_dir)


def test_vocabulary_size_mismatch(bundle_dir):
    Vocabulary([*VOCAB.words, "extra"]).save(bundle_dir / "vocab.json")
    with pytest.raises(BundleError, match="vocabulary has 8 words"):
        load_bundle(bundle_dir)


def test_feature_size_mismatch(bundle_dir):
    edit_config(bundle_dir, encoder={**ENCODER, "feature_dim": 1280})
    with pytest.raises(BundleError, match="expects 8-d features"):
        load_bundle(bundle_dir)


def test_lambda_layer_is_refused_unread(bundle_dir):
    # A Keras file whose config smuggles in a Lambda layer (the classic code-execution vector).
    lambda_layer = {"module": "keras.layers", "class_name": "Lambda",
                    "config": {"function": {"class_name": "__lambda__", "config": {"code": "..."}}}}
    edit_decoder_file(bundle_dir, lambda config: config["config"].update(extra=lambda_layer))
    with pytest.raises(BundleError, match="Lambda"):
        load_bundle(bundle_dir)


def test_foreign_class_is_refused(bundle_dir):
    edit_decoder_file(bundle_dir, lambda config: config["config"].update(
        dtype={"module": "os", "class_name": "system", "config": {}}))
    with pytest.raises(BundleError, match="os.system"):
        load_bundle(bundle_dir)


def test_corrupt_decoder_file(bundle_dir):
    (bundle_dir / "decoder.keras").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(BundleError, match="decoder.keras"):
        load_bundle(bundle_dir)


def test_weights_of_the_wrong_shape(bundle_dir, tmp_path):
    other = ShowAndTell(len(VOCAB), 8, embed_dim=4, units=9)  # 9 units, config says 6
    other.save(tmp_path / "other.keras")
    with zipfile.ZipFile(tmp_path / "other.keras") as z:
        edit_decoder_file(bundle_dir, replace_members={"model.weights.h5": z.read("model.weights.h5")})
    with pytest.raises(BundleError, match="does not load"):
        load_bundle(bundle_dir)
