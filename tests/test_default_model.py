"""The shipped model: loads offline, captions real and generated photos, matches its encoder."""
import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data

from captioner.captioner import Captioner
from captioner import cli
from captioner.paths import SHIPPED_MODEL, model_dir, shipped_models
from captioner.encoder import ImageEncoder
from captioner.synthetic import random_scene, render_scene
from captioner.text import tokenize


@pytest.fixture(scope="module")
def captioner():
    return Captioner.load()  # no argument: the shipped bundle, no training, no download


def is_sentence(text: str, vocab) -> bool:
    words = tokenize(text)
    return 2 <= len(words) <= 30 and all(w in vocab.index for w in words)


def test_shipped_bundle_records_the_encoder_the_project_builds():
    config = json.loads((SHIPPED_MODEL / "config.json").read_text())
    assert config["encoder"] == ImageEncoder(config["encoder"]["name"]).describe()


def test_captions_a_real_photo(captioner):
    result = captioner.caption(skimage.data.coffee())
    assert is_sentence(result.caption, captioner.bundle.vocab), result.caption
    assert np.isfinite(result.log_prob)


def test_captions_a_generated_photo_and_the_examples(captioner):
    picture = render_scene(random_scene(np.random.default_rng(0)), 224)
    examples = sorted((Path(__file__).parent.parent / "data" / "examples").glob("*.jpg"))
    results = captioner.caption([picture, *examples])
    assert len(results) == 5
    for result in results:
        assert result.ok and is_sentence(result.caption, captioner.bundle.vocab), result


def test_the_astronaut_is_a_person(captioner):
    """A check of meaning, not just form. Flickr8k is mostly people and dogs (it has few cats or
    cups, so chelsea and coffee get off-topic sentences); its model must see a person here."""
    result = captioner.caption(skimage.data.astronaut(), beam_size=5, num_results=5)
    people = {"man", "woman", "person", "boy", "girl", "people", "men", "women"}
    assert people & set(tokenize(result.caption)), result.beams


def test_the_examples_get_labels_and_only_the_person_passes_as_familiar(captioner):
    """The encoder recognises the cat and the coffee; the model says that neither, nor the rocket,
    is like its Flickr8k photos (it captions the coffee as a dog), while the astronaut, a person, is."""
    examples = {p.stem: p for p in (Path(__file__).parent.parent / "data" / "examples").glob("*.jpg")}
    results = dict(zip(examples, captioner.caption(list(examples.values()))))
    assert results["coffee"].labels[0][0] == "espresso"
    assert results["chelsea"].labels[0][0] in {"tabby", "tiger cat", "Egyptian cat"}
    assert {name for name, result in results.items() if result.unfamiliar} == {"chelsea", "coffee", "rocket"}
    assert captioner.bundle.familiarity.dev_pass == pytest.approx(0.95, abs=0.01)


def test_shipped_models_are_named_by_their_folder(tmp_path, monkeypatch, capsys):
    """`--model NAME`, `Captioner.load(NAME)` and `$CAPTIONER_MODEL=NAME` take a shipped bundle's
    name; a folder of that name, where there is one, wins; a wrong name is one line listing them."""
    monkeypatch.delenv("CAPTIONER_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert "default" in shipped_models()
    assert model_dir("default") == model_dir() == SHIPPED_MODEL
    assert Captioner.load("default").bundle.directory.resolve() == SHIPPED_MODEL.resolve()
    monkeypatch.setenv("CAPTIONER_MODEL", "default")
    assert model_dir() == SHIPPED_MODEL
    (tmp_path / "default").mkdir()
    assert model_dir("default") == Path("default")
    assert model_dir("runs/default") == Path("runs/default")  # a path is never a name

    assert cli.main(["caption", "photo.jpg", "--model", "nosuch"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--model: nosuch: no such model bundle folder" in error
    assert all(name in error for name in shipped_models())
