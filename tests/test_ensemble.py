"""Ensembles: the step over several decoders (probability average), the ensemble bundle (built,
checked, loaded on both runtimes) and `captioner ensemble`. Untrained tiny decoders, weights
spread wide so their captions differ; photos are random arrays."""
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from helpers import edit_config

from captioner.bundle import MAX_MEMBERS, Bundle, BundleError, add_familiarity_file, load_bundle, save_ensemble
from captioner.captioner import Captioner
from captioner.cli import main
from captioner.decoding import DecodeOptions, decode
from captioner.ensemble import EnsembleStep, mean_probability
from captioner.export_litert import add_litert_files
from captioner.familiarity import build as build_familiarity
from captioner.model import ShowAndTell, ShowAttendTell
from captioner.quiet_tensorflow import keras, tf
from captioner.runtime_tf import TensorFlowStep
from captioner.text import Vocabulary

TINY = {"name": "tiny", "weights_id": "random:seed=0", "image_size": 64, "feature_dim": 64}
VOCAB = Vocabulary.build(["a red circle on a white background", "a blue square and a green triangle"], 1)
OPTIONS = [DecodeOptions("greedy", max_len=6), DecodeOptions("beam", 3, 6, num_results=3)]


def _spread(model, seed: int):
    """Untrained weights spread wider (captions vary) and a low <end> bias (captions have words)."""
    rng = np.random.default_rng(seed)
    model.set_weights([w + rng.normal(0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
    bias = model.head.bias.numpy()
    bias[Vocabulary.end_id] = -3.0
    model.head.bias.assign(bias)
    return model


def _show_and_tell(seed: int, vocab_size: int = len(VOCAB)) -> ShowAndTell:
    keras.utils.set_random_seed(seed)
    return _spread(ShowAndTell(vocab_size, 64, embed_dim=12, units=16, dropout=0.2), seed)


def _attend(seed: int) -> ShowAttendTell:
    keras.utils.set_random_seed(seed)
    return _spread(ShowAttendTell(len(VOCAB), 64, 64, embed_dim=12, units=16, attention_dim=10, dropout=0.2), seed)


@pytest.fixture(scope="module")
def members(tmp_path_factory, tiny_encoder) -> dict:
    """Bundles with their (float) LiteRT files: two Show and Tell decoders and an attention one."""
    root = tmp_path_factory.mktemp("members")
    out = {}
    for name, model in (("st_a", _show_and_tell(1)), ("st_b", _show_and_tell(2)), ("sat", _attend(3))):
        Bundle(model, VOCAB, TINY, DecodeOptions(max_len=8)).save(root / name)
        add_litert_files(root / name, tiny_encoder)
        out[name] = root / name
    return out


def _photos(n: int = 6) -> list[np.ndarray]:
    return list(np.random.default_rng(7).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8))


def _beams(results) -> list:
    return [[(b.caption, b.log_prob) for b in r.beams] for r in results]


# --- the step ---------------------------------------------------------------------------------


def test_the_mean_of_probabilities_keeps_banned_tokens_impossible():
    with np.errstate(divide="ignore"):
        lp = np.log(np.array([[[0.5, 0.5, 0.0]], [[0.9, 0.0, 0.1]]], np.float32))
    got = mean_probability(lp)
    np.testing.assert_allclose(np.exp(got), [[0.7, 0.25, 0.05]], rtol=1e-6)
    assert got[0, 1] > -np.inf and got[0, 2] > -np.inf  # one member's zero does not veto a word
    banned = np.full((2, 1, 3), -np.inf, np.float32)
    banned[:, :, 0] = 0.0
    assert mean_probability(banned).tolist() == [[0.0, -np.inf, -np.inf]]


@pytest.mark.parametrize("options", OPTIONS)
def test_an_ensemble_of_one_model_with_itself_is_that_model(options):
    step = TensorFlowStep(_show_and_tell(1))
    features = np.random.default_rng(0).random((5, 64)).astype(np.float32)
    alone, twice = decode(step, features, options), decode(EnsembleStep([step, step]), features, options)
    assert [[(h.ids, h.log_prob) for h in hyps] for hyps in alone] == \
           [[(h.ids, h.log_prob) for h in hyps] for hyps in twice]
    assert any(h.ids for hyps in alone for h in hyps)


def _reference_greedy(models, grids: np.ndarray, steps: int) -> tuple[list[list[int]], np.ndarray]:
    """Greedy decoding written out: each model's softmax, averaged; the Show and Tell ones read
    the grids' means."""
    n = len(grids)
    reads = [grids if isinstance(m, ShowAttendTell) else grids.mean(axis=1) for m in models]
    states = [m.initial_state(f) for m, f in zip(models, reads)]
    contexts = [m.image_context(f) for m, f in zip(models, reads)]
    banned = Vocabulary.banned_logits(len(VOCAB))
    tokens, ids, total = np.full(n, Vocabulary.start_id, np.int32), [], np.zeros(n)
    for _ in range(steps):
        probs = []
        for i, m in enumerate(models):
            logits, states[i] = m.step(tf.constant(tokens), states[i], contexts[i], tf.range(n))
            probs.append(tf.nn.softmax(logits + banned).numpy().astype(np.float64))
        p = np.mean(probs, axis=0)
        tokens = p.argmax(axis=1).astype(np.int32)
        total += np.log(p[np.arange(n), tokens])
        ids.append(tokens)
    return np.stack(ids, axis=1).tolist(), total


@pytest.mark.parametrize("kinds", [("st", "st"), ("sat", "st")])
def test_two_models_decode_their_mean_probability(kinds):
    models = [_attend(3) if kind == "sat" else _show_and_tell(seed) for kind, seed in zip(kinds, (1, 2))]
    grids = np.random.default_rng(0).random((4, 64, 64)).astype(np.float32)
    features = grids if "sat" in kinds else grids.mean(axis=1)
    steps = 4
    expected_ids, expected_lp = _reference_greedy(models, grids, steps)
    # No <end> in 4 steps (checked), so every caption runs all 4 and the totals compare.
    assert all(Vocabulary.end_id not in row for row in expected_ids)
    ensemble = EnsembleStep([TensorFlowStep(m) for m in models])
    got = decode(ensemble, features, DecodeOptions("greedy", max_len=steps))
    assert [hyps[0].ids for hyps in got] == expected_ids
    np.testing.assert_allclose([hyps[0].log_prob for hyps in got], expected_lp, atol=1e-4)
    reads = [grids if isinstance(m, ShowAttendTell) else grids.mean(axis=1) for m in models]
    alone = [decode(TensorFlowStep(m), f, DecodeOptions("greedy", max_len=steps)) for m, f in zip(models, reads)]
    assert [h[0].ids for h in alone[0]] != [h[0].ids for h in alone[1]]  # the members do disagree
    if "sat" in kinds:  # the attention maps are the attending member's, summing to 1 per word
        for hyps in got:
            assert hyps[0].attention.shape == (steps, 64)
            np.testing.assert_allclose(hyps[0].attention.sum(axis=1), 1.0, atol=1e-5)


def test_an_attention_member_must_come_first():
    with pytest.raises(ValueError, match="attention member must come first"):
        EnsembleStep([TensorFlowStep(_show_and_tell(1)), TensorFlowStep(_attend(3))])


# --- the bundle ---------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["tf", "litert-float"])
def test_an_ensemble_bundle_of_a_model_with_itself_captions_as_the_model(members, tmp_path, runtime):
    ensemble = save_ensemble([members["st_a"], members["st_a"]], tmp_path / "e")
    assert ensemble.model_type == "ensemble" and ensemble.decoding == DecodeOptions(max_len=8)
    alone, both = Captioner.load(members["st_a"], runtime=runtime), Captioner.load(tmp_path / "e", runtime=runtime)
    assert both.runtime == alone.runtime and isinstance(both.step_model, EnsembleStep)
    options = replace(both.options, num_results=3)
    assert _beams(both.caption(_photos(), options)) == _beams(alone.caption(_photos(), options))


def test_a_mixed_ensemble_bundle_gives_the_same_captions_on_both_runtimes(members, tmp_path):
    save_ensemble([members["sat"], members["st_a"], members["st_b"]], tmp_path / "e")
    assert Captioner.load(tmp_path / "e").runtime == "litert"  # "auto": every member has the files
    tf_run, lite_run = Captioner.load(tmp_path / "e", runtime="tf"), Captioner.load(tmp_path / "e", runtime="litert")
    assert tf_run.grid_shape == lite_run.grid_shape == (8, 8)
    options = DecodeOptions("beam", 3, 8, num_results=3)
    expected, got = tf_run.caption(_photos(), options), lite_run.caption(_photos(), options)
    assert all(r.caption for r in expected)
    for a, b in zip(expected, got):
        assert [x.caption for x in a.beams] == [x.caption for x in b.beams]
        np.testing.assert_allclose([x.log_prob for x in a.beams], [x.log_prob for x in b.beams], atol=1e-3)
        assert a.attention.shape == (len(a.caption.split()), 8, 8)
        np.testing.assert_allclose(a.attention, b.attention, atol=1e-4)
    # It is not one of its members: the three together caption differently from the first alone.
    alone = Captioner.load(members["sat"], runtime="tf").caption(_photos(), options)
    assert [r.caption for r in alone] != [r.caption for r in expected]


def test_members_that_cannot_caption_together_are_refused_by_name(members, tmp_path):
    other_vocab = tmp_path / "other-vocab"
    Bundle(_show_and_tell(4, len(VOCAB) + 1), Vocabulary([*VOCAB.words, "hexagon"]), TINY).save(other_vocab)
    other_encoder = tmp_path / "other-encoder"
    Bundle(_show_and_tell(4), VOCAB, {**TINY, "weights_id": "random:seed=1"}).save(other_encoder)
    for bad, reason in ((other_vocab, "vocabulary"), (other_encoder, "encoder")):
        with pytest.raises(BundleError, match=f"^{bad}: .*{reason}"):
            save_ensemble([members["st_a"], bad], tmp_path / "e")
    with pytest.raises(BundleError, match=f"^{members['sat']}: an attention model must come first"):
        save_ensemble([members["st_a"], members["sat"]], tmp_path / "e")
    with pytest.raises(BundleError, match="2 to 8 models, got 1"):
        save_ensemble([members["st_a"]], tmp_path / "e")
    save_ensemble([members["st_a"], members["st_b"]], tmp_path / "e")
    with pytest.raises(BundleError, match="an ensemble itself"):
        save_ensemble([tmp_path / "e", members["st_a"]], tmp_path / "e2")
    assert not (tmp_path / "e2").exists()
    # A member swapped after the build is refused when the ensemble loads, by its folder.
    shutil.rmtree(tmp_path / "e" / "members" / "1")
    shutil.copytree(other_vocab, tmp_path / "e" / "members" / "1")
    with pytest.raises(BundleError, match=r"members/1: its vocabulary"):
        load_bundle(tmp_path / "e", load_decoder=False)


@pytest.mark.parametrize("members_field", [
    ["../x", "members/1"], ["members/1", "members/0"], ["members/0"], "members/0", [0, 1], None,
    [f"members/{i}" for i in range(MAX_MEMBERS + 1)], ["members/0", "members/1", "/etc"],
])
def test_a_hostile_ensemble_config_is_refused(members, tmp_path, members_field):
    save_ensemble([members["st_a"], members["st_b"]], tmp_path / "e")
    edit_config(tmp_path / "e", members=members_field)
    with pytest.raises(BundleError, match="'members' must list 2 to 8 folders named members/0"):
        load_bundle(tmp_path / "e")


@pytest.mark.parametrize("field, value, match", [
    ("format_version", 1, "'format_version' must be 2"), ("decoding", {"beam_size": 0}, "beam_size"),
    ("encoder", {"name": "tiny"}, "'encoder' must give"), ("info", [], "'info' must be an object"),
])
def test_an_ensemble_config_is_checked_field_by_field(members, tmp_path, field, value, match):
    save_ensemble([members["st_a"], members["st_b"]], tmp_path / "e")
    edit_config(tmp_path / "e", **{field: value})
    with pytest.raises(BundleError, match=match):
        load_bundle(tmp_path / "e")


def test_members_are_read_as_any_bundle_and_never_outside(members, tmp_path):
    save_ensemble([members["st_a"], members["st_b"]], tmp_path / "e")
    # A member's runtime file is checked against its config as any bundle's is.
    (tmp_path / "e" / "members" / "1" / "decoder.tflite").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="members/1/decoder.tflite: does not match the SHA-256"):
        Captioner.load(tmp_path / "e", runtime="litert")
    # A member folder that is a symlink out of the ensemble is not followed.
    shutil.rmtree(tmp_path / "e" / "members" / "1")
    (tmp_path / "e" / "members" / "1").symlink_to(members["st_b"])
    with pytest.raises(BundleError, match="points outside the bundle"):
        load_bundle(tmp_path / "e")
    # Nested ensembles are refused as a member's model type.
    save_ensemble([members["st_a"], members["st_b"]], tmp_path / "inner")
    (tmp_path / "e" / "members" / "1").unlink()
    shutil.copytree(tmp_path / "inner", tmp_path / "e" / "members" / "1")
    with pytest.raises(BundleError, match="members/1/config.json: 'model_type' must be one of"):
        load_bundle(tmp_path / "e")
    # A member folder that is a symlink loop gets one line, not a traceback.
    shutil.rmtree(tmp_path / "e" / "members" / "1")
    (tmp_path / "e" / "members" / "1").symlink_to(tmp_path / "e" / "members" / "1")
    with pytest.raises(BundleError, match="members/1: a symlink loop"):
        load_bundle(tmp_path / "e")


def test_only_the_first_members_familiarity_is_read(members, tmp_path):
    save_ensemble([members["st_a"], members["st_b"]], tmp_path / "e")
    rng = np.random.default_rng(0)
    familiarity = build_familiarity(rng.normal(size=(40, 64)), rng.normal(size=(10, 64)))
    for i in (0, 1):
        add_familiarity_file(load_bundle(tmp_path / "e" / "members" / str(i), load_decoder=False), familiarity)
    (tmp_path / "e" / "members" / "1" / "familiarity.npy").unlink()  # unread, so not missed
    bundle = load_bundle(tmp_path / "e", load_decoder=False)
    assert bundle.familiarity is not None and bundle.members[1].familiarity is None
    (tmp_path / "e" / "members" / "0" / "familiarity.npy").unlink()
    with pytest.raises(BundleError, match="members/0"):
        load_bundle(tmp_path / "e", load_decoder=False)


def test_litert_names_the_member_without_its_files(members, tmp_path):
    save_ensemble([members["st_a"], members["st_b"]], tmp_path / "e")
    edit_config(tmp_path / "e" / "members" / "1", litert={})
    with pytest.raises(BundleError, match="its member .*members/1 has no LiteRT files .* `captioner ensemble` again"):
        Captioner.load(tmp_path / "e", runtime="litert")
    assert Captioner.load(tmp_path / "e").runtime == "tf"  # "auto" falls back to TensorFlow


def test_an_ensemble_cannot_be_exported_into(members, tmp_path):
    save_ensemble([members["st_a"], members["st_b"]], tmp_path / "e")
    before = sorted(p.name for p in (tmp_path / "e").iterdir())
    with pytest.raises(BundleError, match="an ensemble bundle; export its members"):
        add_litert_files(tmp_path / "e")
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == before


# --- the command ----------------------------------------------------------------------------------


def test_the_ensemble_command_builds_a_bundle_the_caption_command_runs(members, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["ensemble", str(members["sat"]), str(members["st_a"]), "--output", str(out)]) == 0
    assert "ensemble of 2 models written to" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ensemble" and config["members"] == ["members/0", "members/1"]
    assert main(["ensemble", str(members["st_a"]), str(members["st_b"]), "--output", str(out)]) == 2
    assert "exists; add --overwrite" in capsys.readouterr().err
    assert main(["ensemble", str(members["st_a"]), str(members["sat"]), "--output", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{members['sat']}: an attention model must come first" in err

    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.fromarray(_photos(1)[0]).save(photo)
    maps = tmp_path / "maps"
    assert main(["caption", str(photo), "--model", str(out), "--save-attention", str(maps)]) == 0
    assert capsys.readouterr().out.startswith(f"{photo}\t")
    assert (maps / "photo.png").is_file()
