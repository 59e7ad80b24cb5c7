"""The `captioner` command through real subprocesses, as a user runs it.

Starting Python with TensorFlow takes seconds, so every command of this file is started once,
a few at a time, by the `runs` fixture; the tests then check what each one did.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.cli import build_parser, main
from captioner.output import FIELDS as OUTPUT_FIELDS
from captioner.synthetic import random_scene, render_scene

ROOT = Path(__file__).resolve().parents[1]
NOT_AN_IMAGE = "not an image in a supported format (JPEG, PNG, WebP, BMP, GIF or TIFF)"
SUBCOMMANDS = ["caption", "extract-features", "train", "evaluate", "export", "ensemble", "make-shapes", "encoders", "beam",
               "import-features", "serve"]


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]


def make_photos(folder: Path) -> dict[str, str | None]:
    """Four good photos and the three broken files of issue 2; {name: expected reason or None}."""
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        render_scene(random_scene(rng), 64).save(folder / f"good_{i}.jpg", quality=90)
    good = (folder / "good_0.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("remember to buy milk\n")
    (folder / "readme.txt").write_text("not picked up: wrong suffix\n")
    return {**{f"good_{i}.jpg": None for i in range(4)}, "broken.jpg": "corrupt or truncated image",
            "empty.jpg": "empty file (0 bytes)", "notes.jpg": NOT_AN_IMAGE}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trained_run, attend_run) -> dict[str, Run]:
    base = tmp_path_factory.mktemp("cli")
    photos = base / "photos"
    expected = make_photos(photos)
    model = str(trained_run[0] / "model")
    attend_model = str(attend_run[0] / "model")
    # Two photos of the same name in two folders, and a broken one, for --save-attention.
    for folder in ("a", "b"):
        (base / "same" / folder).mkdir(parents=True)
    (base / "same" / "a" / "x.jpg").write_bytes((photos / "good_0.jpg").read_bytes())
    (base / "same" / "b" / "x.jpg").write_bytes((photos / "good_1.jpg").read_bytes())
    (base / "same" / "b" / "broken.jpg").write_bytes((photos / "broken.jpg").read_bytes())
    # a JSONL file left by a run killed after two rows, in the middle of the third
    partial = base / "partial.jsonl"
    kept = [{**dict.fromkeys(OUTPUT_FIELDS), "image": str(photos / "good_0.jpg"), "caption": "a kept caption",
             "log_prob": -1.0, "score": -0.5},
            {**dict.fromkeys(OUTPUT_FIELDS), "image": str(photos / "empty.jpg"), "error": "empty file (0 bytes)"}]
    partial.write_text("".join(json.dumps(row) + "\n" for row in kept)
                       + json.dumps({"image": str(photos / "good_1.jpg"), "caption": "a torn row"})[:40],
                       encoding="utf-8")
    (base / "foreign.csv").write_text("name,score\nalice,3\n")
    noise = base / "noise.png"  # unlike the generated shapes the model learned from
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noise)
    (base / "taken.csv").write_text("somebody's work\n")
    # Names that once stopped a batch or forged output lines: not UTF-8, a newline, a formula.
    odd = base / "odd"
    odd.mkdir()
    good = (photos / "good_0.jpg").read_bytes()
    for name in (b"caf\xe9.jpg", b"two\nerror: lines.jpg", b"=1+1.jpg"):
        (odd / os.fsdecode(name)).write_bytes(good)
    (odd / os.fsdecode(b"bad\n\x1b[31mred.jpg")).write_bytes(b"not a photo")
    # A `tensorflow` that fails on import: commands that need no model must not import the real one.
    poison = base / "poison"
    poison.mkdir()
    (poison / "tensorflow.py").write_text("raise ImportError('TensorFlow was imported')\n")
    commands = {
        "csv": ["caption", str(photos), "--model", model, "-o", str(base / "out.csv")],
        "stdout": ["caption", str(photos / "good_1.jpg"), str(photos / "good_2.jpg"), str(photos / "notes.jpg"),
                   "--model", model, "--top", "2"],
        "resume": ["caption", str(photos), "--model", model, "-o", str(partial), "--resume"],
        "missing path": ["caption", str(photos / "nope.jpg"), "--model", model],
        "odd names": ["caption", str(odd), "--model", model, "-o", str(base / "odd.csv")],
        "top csv": ["caption", str(photos / "good_1.jpg"), "--model", model, "--top", "3", "-o", str(base / "top.csv")],
        "top jsonl": ["caption", str(photos / "good_1.jpg"), "--model", model, "--top", "3",
                      "-o", str(base / "top.jsonl")],
        "missing model": ["caption", str(photos), "--model", str(base / "no-such-model")],
        "bad value": ["caption", str(photos / "good_0.jpg"), "--model", model, "--beam-size", "0"],
        "unfamiliar": ["caption", str(noise), str(photos / "good_0.jpg"), "--model", model],
        "resume without output": ["caption", str(photos), "--resume"],
        "top greedy": ["caption", str(photos), "--method", "greedy", "--top", "2"],
        "existing output": ["caption", str(photos), "-o", str(base / "taken.csv")],
        "bad option": ["caption", str(photos), "--beam-size", "wide"],
        "unknown option": ["caption", str(photos), "--frobnicate"],
        "bad output": ["caption", str(photos), "-o", str(base / "out.txt")],
        "foreign resume": ["caption", str(photos), "-o", str(base / "foreign.csv"), "--resume"],
        "no command": [],
        "attention maps": ["caption", str(base / "same"), "-r", "--model", attend_model,
                           "--save-attention", str(base / "maps")],
        "attention without attention": ["caption", str(photos), "--model", model,
                                        "--save-attention", str(base / "no-maps")],
        **{f"help {name}": [name, "--help"] for name in SUBCOMMANDS},
        "help": ["--help"],
    }
    # As a user's shell has it: no TF_CPP_MIN_LOG_LEVEL; oneDNN on, as TensorFlow does by default on
    # AVX-512 CPUs (and its start-up notices with it), so that these runs see what such a CPU shows.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TF_")},
           "CAPTIONER_HOME": str(base / "home"), "PYTHONPATH": str(ROOT), "TF_ENABLE_ONEDNN_OPTS": "1"}
    needs_no_model = {"missing model", "bad value", "resume without output", "top greedy", "existing output",
                      "bad output", "foreign resume", "attention without attention"}

    def run(name: str, args: list[str]) -> Run:
        path = f"{poison}{os.pathsep}{ROOT}" if name in needs_no_model else str(ROOT)
        done = subprocess.run([sys.executable, "-m", "captioner", *args], capture_output=True, text=True,
                              env={**env, "PYTHONPATH": path}, cwd=base, timeout=300, check=False)
        return Run(args, done.returncode, done.stdout, done.stderr)

    with ThreadPoolExecutor(max_workers=4) as pool:  # two busy cores: a few processes at a time
        results = dict(zip(commands, pool.map(run, commands, commands.values())))
    results["meta"] = (base, photos, expected)  # type: ignore[assignment]
    return results


def no_traceback(run: Run) -> None:
    assert "Traceback" not in run.stderr + run.stdout, run.stderr


OWN_LINES = ("error: ", "warning: ", "captioned ", "resuming: ", "nothing to caption")


def test_a_photo_unlike_the_training_photos_gets_a_warning(runs):
    run = runs["unfamiliar"]
    assert run.returncode == 0 and len(run.stdout.splitlines()) == 2  # captioned all the same
    [warning] = [line for line in run.stderr.splitlines() if line.startswith("warning: ")]
    assert warning.startswith(f"warning: {runs['meta'][0] / 'noise.png'}: unlike the photos the model learned from")
    assert re.search(r"\(familiarity -?0\.\d\d, below the model's -?0\.\d\d\)$", warning), warning


@pytest.mark.parametrize("name", ["csv", "stdout", "resume", "top csv", "unfamiliar"])
def test_stderr_holds_only_captioners_own_lines(runs, name):
    """No TensorFlow start-up notice (oneDNN, absl) or C++ log line reaches the user, on any CPU."""
    foreign = [line for line in runs[name].stderr.splitlines() if not line.startswith(OWN_LINES)]
    assert foreign == [], runs[name].stderr


def test_caption_a_folder_with_broken_files(runs):
    base, photos, expected = runs["meta"]
    run = runs["csv"]
    no_traceback(run)
    assert run.returncode == 1, run.stderr  # some photos failed
    failing = {name: reason for name, reason in expected.items() if reason}
    for name, reason in failing.items():  # "error: <file>: <reason>", once each
        assert sum(line.startswith(f"error: {photos / name}: {reason}") for line in run.error_lines) == 1
    assert len(run.error_lines) == len(failing) == 3
    assert "captioned 4 of 7 photos" in run.stderr and "3 failed" in run.stderr
    with open(base / "out.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["image"]).name for r in rows] == sorted(expected)  # in order, readme.txt not picked up
    for row in rows:
        reason = expected[Path(row["image"]).name]
        if reason is None:
            assert row["caption"] and float(row["log_prob"]) < 0 and row["error"] == ""
        else:
            assert row["caption"] == "" and row["log_prob"] == "" and row["error"].startswith(reason)


def test_caption_to_stdout_with_top_beams(runs):
    _, photos, _ = runs["meta"]
    run = runs["stdout"]
    no_traceback(run)
    assert run.returncode == 1
    lines = run.stdout.splitlines()
    captions = [line for line in lines if not line.startswith("\t")]
    assert [line.split("\t")[0] for line in captions] == [str(photos / "good_1.jpg"), str(photos / "good_2.jpg")]
    assert all(line.split("\t")[1] for line in captions)
    beams = [line.split("\t") for line in lines if line.startswith("\t")]
    assert [b[1] for b in beams] == ["1", "2", "1", "2"]  # two ranked beams under each photo
    for first, second, caption in zip(beams[::2], beams[1::2], captions):
        assert first[4] == caption.split("\t")[1]  # the caption is the first beam
        assert float(first[2].split()[1]) >= float(second[2].split()[1])  # ranked by score
        assert all(float(b[3].split()[1]) < 0 for b in (first, second))
    assert run.error_lines == [f"error: {photos / 'notes.jpg'}: {NOT_AN_IMAGE}"]


def test_resume_keeps_finished_rows_and_drops_a_torn_one(runs):
    """--resume after a kill (JSONL here; the kill tests do both formats): the finished rows stay
    as they are, the torn one goes, every photo ends up in the file exactly once."""
    base, photos, expected = runs["meta"]
    run = runs["resume"]
    no_traceback(run)
    assert run.returncode == 1  # broken.jpg and notes.jpg still fail
    assert "resuming: 1 photos already in" in run.stderr  # the failed photo is tried again
    assert "captioned 3 of 6 photos" in run.stderr
    text = (base / "partial.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n") and "a torn" not in text
    rows = [json.loads(line) for line in text.splitlines()]  # every line whole
    assert [set(r) for r in rows] == [set(OUTPUT_FIELDS)] * len(rows)
    assert sorted(Path(r["image"]).name for r in rows) == sorted(expected)  # each photo once
    assert rows[0]["caption"] == "a kept caption"  # finished work is never redone or rewritten
    good_3 = next(r for r in rows if r["image"] == str(photos / "good_3.jpg"))
    assert good_3["caption"] and good_3["error"] is None and isinstance(good_3["log_prob"], float)
    notes = next(r for r in rows if r["image"] == str(photos / "notes.jpg"))
    assert notes == {**dict.fromkeys(OUTPUT_FIELDS), "image": str(photos / "notes.jpg"), "error": NOT_AN_IMAGE}


def test_top_beams_in_csv_and_jsonl(runs):
    base, _, _ = runs["meta"]
    for name in ("top csv", "top jsonl"):
        no_traceback(runs[name])
        assert runs[name].returncode == 0, runs[name].stderr
    with open(base / "top.csv", newline="", encoding="utf-8") as f:
        [row] = list(csv.DictReader(f))
    assert [k for k in row if k.startswith("caption")] == ["caption", "caption_2", "caption_3"]
    scores = [float(row[k]) for k in ("score", "score_2", "score_3")]
    assert scores == sorted(scores, reverse=True) and len({row["caption"], row["caption_2"], row["caption_3"]}) == 3
    [record] = [json.loads(line) for line in (base / "top.jsonl").read_text().splitlines()]
    assert [b["caption"] for b in record["beams"]] == [row["caption"], row["caption_2"], row["caption_3"]]
    assert record["beams"][0] == {k: record[k] for k in ("caption", "log_prob", "score")}


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing path", "nope.jpg: no such file or directory"),
        ("missing model", "--model: "),
        ("bad value", "--beam-size: must be a whole number from 1 to 64, got 0"),
        ("bad output", "out.txt: output must end in .csv or .jsonl"),
        ("foreign resume", "foreign.csv: not a captioner output file with these columns"),
        ("resume without output", "--resume: continues an --output file; give -o FILE"),
        ("top greedy", "--top: 2 beams need --method beam"),
        ("existing output", "taken.csv: already exists; add --resume to continue it or --overwrite to replace it"),
        ("attention without attention", "--save-attention: "),
    ],
)
def test_user_errors_are_one_line(runs, name, message):
    """Each is found before TensorFlow is imported (those runs have a `tensorflow` that fails to
    import) and is one line naming the flag or file."""
    run = runs[name]
    no_traceback(run)
    assert run.returncode == 2, run.stderr
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("captioner: error: ") and message in line, line


@pytest.mark.parametrize("name, message", [
    ("bad option", "argument --beam-size: invalid int value: 'wide'"),
    ("unknown option", "unrecognized arguments: --frobnicate"),
    ("no command", "the following arguments are required: COMMAND"),
])
def test_bad_options_are_argparse_errors(runs, name, message):
    run = runs[name]
    no_traceback(run)
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("captioner") and "error: " + message in last, run.stderr


def test_help_for_every_subcommand(runs):
    listed = runs["help"]
    assert listed.returncode == 0 and all(name in listed.stdout for name in SUBCOMMANDS)
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(subparsers.choices) == sorted(SUBCOMMANDS)  # a new subcommand needs a row above
    for name in SUBCOMMANDS:
        run = runs[f"help {name}"]
        no_traceback(run)
        assert run.returncode == 0 and run.stdout.startswith(f"usage: captioner {name}"), run.stderr
    assert "--resume" in runs["help caption"].stdout and "--recursive" in runs["help caption"].stdout
    assert "--epochs" in runs["help train"].stdout and "--preset" in runs["help train"].stdout




def test_an_existing_output_is_left_alone_when_refused(runs):
    base, _, _ = runs["meta"]
    assert (base / "taken.csv").read_text() == "somebody's work\n"


def test_odd_file_names_neither_stop_the_batch_nor_forge_lines(runs):
    base, _, _ = runs["meta"]
    run = runs["odd names"]
    no_traceback(run)
    assert run.returncode == 1  # the one broken photo
    [error] = run.error_lines  # one line for it, its newline and escape code shown escaped
    assert "bad\\n\\x1b[31mred.jpg: " in error and "\x1b" not in run.stderr
    with open(base / "odd.csv", newline="", encoding="utf-8") as f:
        names = sorted(Path(r["image"]).name for r in csv.DictReader(f))
    assert names == ["=1+1.jpg", "bad\n\x1b[31mred.jpg", "caf\\xe9.jpg", "two\nerror: lines.jpg"]


@pytest.mark.parametrize("grid", [False, True])
def test_extract_features_fills_the_cache_training_reads(shapes_root, tiny_encoder, tmp_path, grid):
    from captioner.data import load_dataset
    from captioner.features import FeatureCache, GridEncoder, content_key

    cache_dir = tmp_path / "cache"
    assert main(["extract-features", "--data", str(shapes_root), "--split", "dev", "--encoder", "tiny",
                 "--cache-dir", str(cache_dir), *(["--grid"] if grid else [])]) == 0
    encoder = GridEncoder(tiny_encoder) if grid else tiny_encoder
    cache = FeatureCache(tiny_encoder.describe(), cache_dir, grid_shape=encoder.grid_shape if grid else None)
    dataset = load_dataset(shapes_root)
    for image_id in dataset.splits["dev"]:
        vector = cache.get(content_key(dataset.images[image_id]))
        assert vector is not None and vector.shape == cache.shape


def test_attention_maps_are_written_one_png_per_photo(runs, attend_run):
    """Photos of the same name get distinct files; a broken photo gets none; each file is the
    strip of that photo's words, drawn from its attention."""
    base, _, _ = runs["meta"]
    run = runs["attention maps"]
    no_traceback(run)
    assert run.returncode == 1  # the broken photo
    assert f"attention maps in {base / 'maps'}" in run.stderr
    assert sorted(os.listdir(base / "maps")) == ["x-2.png", "x.png"]  # a/x.jpg, then b/x.jpg; no temporaries
    captions = dict(line.split("\t") for line in run.stdout.splitlines())
    from captioner.attention_maps import strip
    from captioner.captioner import Captioner

    captioner = Captioner.load(attend_run[0] / "model")
    for folder, name in (("a", "x.png"), ("b", "x-2.png")):
        photo = base / "same" / folder / "x.jpg"
        result = captioner.caption(str(photo))
        assert captions[str(photo)] == result.caption
        with Image.open(base / "maps" / name) as written:
            assert written.format == "PNG"
            expected = strip(str(photo), result.caption.split(), result.attention)
            assert written.size == expected.size
            difference = np.abs(np.asarray(written.convert("RGB"), np.int16) - np.asarray(expected, np.int16))
            assert difference.max() <= 2  # the same picture (float rounding in another process aside)


def test_attention_maps_need_an_attention_model(runs):
    base, _, _ = runs["meta"]
    [line] = runs["attention without attention"].stderr.strip().splitlines()
    assert "is a show-and-tell model, which has no attention maps" in line
    assert not (base / "no-maps").exists()
