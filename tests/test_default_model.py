"""The shipped model: loads offline, captions real and generated photos, matches its encoder."""
import json
import os
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
    name; a folder of that name, where there is one, wins; a path is never a name; a wrong name
    is one line listing the shipped ones, before anything is loaded."""
    monkeypatch.delenv("CAPTIONER_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert "default" in shipped_models()
    assert model_dir("default") == model_dir() == SHIPPED_MODEL
    assert Captioner.load("default").bundle.directory.resolve() == SHIPPED_MODEL.resolve()
    for args in (["caption", "x.jpg", "--model", "default"], ["ensemble", "default", "default", "--output", "e"],
                 ["train", "--data", ".", "--output", "o", "--scst", "--init", "default"]):
        cli.check_args(cli.build_parser().parse_args(args))
    monkeypatch.setenv("CAPTIONER_MODEL", "default")
    assert model_dir() == SHIPPED_MODEL
    (tmp_path / "default").write_text("not a folder")
    assert model_dir("default") == SHIPPED_MODEL
    assert model_dir("./default") == Path("./default")  # a path is never a name
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "default").mkdir()
    monkeypatch.chdir(tmp_path / "mine")
    assert model_dir("default") == Path("default")

    def error(args: list[str]) -> str:
        assert cli.main(args) == 2
        return capsys.readouterr().err

    message = error(["caption", "photo.jpg", "--model", "nosuch"])
    assert message.count("\n") == 1 and "--model: nosuch: no such model bundle folder" in message
    assert all(name in message for name in shipped_models())
    monkeypatch.setenv("CAPTIONER_MODEL", "defualt")
    assert "$CAPTIONER_MODEL: defualt: no such model bundle folder" in error(["caption", "photo.jpg"])


def test_its_small_products_run_on_one_blas_thread_from_concurrent_callers(captioner, monkeypatch):
    """The ImageNet head and the familiarity score are a few rows each: a second OpenBLAS thread
    would only spin after them against the encoder's threads. They run on one, also when several
    threads caption at once (the app's sessions, a server's passes), and OpenBLAS's thread count
    is what it was afterwards."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    def blas_threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    before = blas_threads()
    assert before and (max(before) > 1 or len(os.sched_getaffinity(0)) == 1)  # one per core by default
    seen, lock = [], threading.Lock()

    def spy(method):
        def run(self, vectors):
            with lock:
                seen.append((method.__name__, blas_threads()))
            return method(self, vectors)
        return run

    for kind in (type(captioner.head), type(captioner.bundle.familiarity)):
        name = "top" if kind is type(captioner.head) else "scores"
        monkeypatch.setattr(kind, name, spy(getattr(kind, name)))
    photo = render_scene(random_scene(np.random.default_rng(1)), 224)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: captioner.caption(photo), range(16)))
    assert all(r.labels and r.familiarity is not None for r in results)
    assert sorted({name for name, _ in seen}) == ["scores", "top"] and len(seen) == 32
    assert all(threads == {1} for _, threads in seen)
    assert blas_threads() == before
