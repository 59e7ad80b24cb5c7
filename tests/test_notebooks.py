"""The notebooks: committed clean, and all run top to bottom on the generated demo set.

The run test executes 01_train (tiny encoder and preset, a few epochs), then 02_evaluate on the
bundle it saved, then 03_attention (which trains a tiny attention model on the same demo set),
papermill-style: a cell injected after the `parameters` cell overrides the settings.
Everything it writes goes to a temporary folder; nothing is downloaded and Flickr8k is never read.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("01_train.ipynb", "02_evaluate.ipynb", "03_attention.ipynb")
KERNEL = "captioner-notebook-test"
DECODINGS = ("greedy", "beam 1", "beam 3", "beam 5")
EPOCHS = 6
ATTENTION_EPOCHS = 8

_spec = importlib.util.spec_from_file_location("check_notebooks", ROOT / "scripts" / "check_notebooks.py")
check_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_notebooks)


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / name, as_version=4)


# ----------------------------------------------------------------------------- hygiene


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_clean(name):
    assert check_notebooks.problems(read(name)) == []


def test_checker_flags_and_fixes_an_executed_notebook(tmp_path, capsys):
    nb = read(NAMES[0])
    sources = [c.source for c in nb.cells]
    code = next(c for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", []))
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    code.execution_count = 3
    code.metadata["collapsed"] = True
    code.id = "3f9a2c"  # what Jupyter gives a new cell
    nb.metadata["widgets"] = {}
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.7"}
    path = tmp_path / "dirty.ipynb"
    nbformat.write(nb, path)

    assert check_notebooks.main([str(path)]) == 1
    report = capsys.readouterr().out
    for problem in ("has outputs", "execution count", "metadata has collapsed", "metadata has widgets",
                    "language_info", "id '3f9a2c'"):
        assert problem in report

    assert check_notebooks.main([str(path), "--fix"]) == 0
    fixed = nbformat.read(path, as_version=4)
    assert check_notebooks.problems(fixed) == []
    assert [c.source for c in fixed.cells] == sources
    assert fixed.cells[1].metadata["tags"] == ["parameters"]


def test_checker_rejects_code_in_the_parameters_cell():
    nb = read(NAMES[0])
    nb.cells[1].source += "\nOUTPUT = Path(OUTPUT_DIR)"
    assert any("is not `NAME = literal`" in p for p in check_notebooks.problems(nb))
    nb.cells[1].metadata["tags"] = []
    assert any("must be tagged 'parameters'" in p for p in check_notebooks.problems(nb))


# ----------------------------------------------------------------------------- end to end


def execute(name: str, parameters: dict, timeout: int = 240) -> nbformat.NotebookNode:
    """Run a notebook from the notebooks folder with `parameters` injected after its parameters cell."""
    from nbclient import NotebookClient

    nb = read(name)
    unknown = set(parameters) - check_notebooks.parameter_names(nb)
    assert not unknown, f"{name} has no parameters {unknown}"
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=timeout, kernel_name=KERNEL,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def output_text(nb: nbformat.NotebookNode) -> str:
    """Everything the cells printed or displayed as text."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") + out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def figures(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The notebooks executed: 01 on a demo set it generates, 02 on the bundle 01 saved, 03 on the
    same demo set."""
    tmp = tmp_path_factory.mktemp("notebooks")
    # A kernel spec for this interpreter, so the kernel sees the same packages as the tests.
    spec_dir = tmp / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "captioner tests", "language": "python",
    }))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JUPYTER_PATH", str(tmp / "jupyter"), prepend=os.pathsep)
        env.setenv("PYTHONPATH", str(ROOT), prepend=os.pathsep)  # the package, installed or not
        env.setenv("CAPTIONER_HOME", str(tmp / "home"))
        env.delenv("CAPTIONER_MODEL", raising=False)
        env.setenv("CAPTIONER_DATA", str(tmp / "no-flickr8k"))  # as on a machine without Flickr8k
        started = time.perf_counter()
        train = execute("01_train.ipynb", {
            "DATA_DIR": str(tmp / "no-dataset-here"),  # missing: the notebook generates the demo set
            "DEMO_DIR": str(tmp / "shapes"),
            "DEMO_IMAGES": 200,
            "ENCODER": "tiny",
            "PRESET": "tiny",
            "EPOCHS": EPOCHS,
            "OUTPUT_DIR": str(tmp / "run"),
        })
        middle = time.perf_counter()
        evaluate = execute("02_evaluate.ipynb", {
            "MODEL_DIR": str(tmp / "run" / "model"),
            "DEMO_DIR": str(tmp / "shapes"),  # no Flickr8k: the notebook falls back to the demo set
            "OUTPUT_DIR": str(tmp / "evaluation"),
            "GRID": 4,
        })
        ended = time.perf_counter()
        attention = execute("03_attention.ipynb", {
            "DEMO_DIR": str(tmp / "shapes"),
            "EPOCHS": ATTENTION_EPOCHS,
            "OUTPUT_DIR": str(tmp / "attention"),
            "PHOTOS": 2,
        })
    print(f"01_train {middle - started:.1f} s, 02_evaluate {ended - middle:.1f} s, "
          f"03_attention {time.perf_counter() - ended:.1f} s")
    return tmp, train, evaluate, attention


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_notebook_generates_data_trains_and_saves_a_bundle(runs):
    tmp, train, _, _ = runs
    assert (tmp / "shapes" / "dataset_shapes.json").is_file()
    from captioner.bundle import load_bundle

    bundle = load_bundle(tmp / "run" / "model")
    assert bundle.encoder["name"] == "tiny"
    with open(tmp / "run" / "history.csv") as f:
        history = f.read().splitlines()
    assert history[0].split(",")[:1] == ["epoch"] and "val_bleu4" in history[0]
    assert len(history) == 1 + EPOCHS
    # the features the notebook extracted went to $CAPTIONER_HOME, where train() found them
    assert any((tmp / "home" / "features").rglob("*.npy"))
    text = output_text(train)
    assert "Total params" in text  # model.summary()
    assert "features (180, 64), cached in" in text
    assert figures(train) >= 4  # photos, statistics, learning curves, sample captions


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_evaluate_notebook_scores_the_trained_bundle(runs):
    tmp, _, evaluate, _ = runs
    text = output_text(evaluate)
    assert f"evaluating on {(tmp / 'shapes').resolve()}" in text
    scores = {}
    for name in DECODINGS:
        report = json.loads((tmp / "evaluation" / name.replace(" ", "-") / "report.json").read_text())
        assert report["split"] == "dev" and report["images"] == 20
        scores[name] = report["scores"]
        assert name in text  # a row of the BLEU table
    assert set(scores["greedy"]) == {f"BLEU-{n}" for n in range(1, 5)}
    assert scores["greedy"] == scores["beam 1"]  # width 1 is greedy decoding
    assert "distinct captions for 20 photos" in text
    assert figures(evaluate) >= 5  # BLEU bars, grid, best, worst, error analysis


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_attention_notebook_trains_an_attention_model_and_draws_its_maps(runs):
    tmp, _, _, attention = runs
    from captioner.bundle import load_bundle

    assert load_bundle(tmp / "attention" / "model", load_decoder=False).model_type == "show-attend-tell"
    text = output_text(attention)
    assert "show-attend-tell, encoder tiny, attends over 8×8 regions" in text
    assert "saved 2 pictures in" in text
    assert "of the colour word's attention on its quarter" in text or "named the shape's colour in 0 of" in text
    pictures = sorted((tmp / "attention" / "maps").glob("*.png"))
    assert len(pictures) == 2
    assert figures(attention) >= 4  # two strips, the word beside its photo, the corner check
