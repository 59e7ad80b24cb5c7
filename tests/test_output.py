"""Result rows and the files they go to: escaping, locking, never losing a file, resuming."""
from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import pytest

from captioner.captioner import Beam, CaptionResult
from captioner.output import OutputError, RowWriter, csv_fields, results_csv, row, terminal_text


def ok(name: str, caption: str = "a dog runs", *more: str) -> CaptionResult:
    beams = [Beam(text, -1.0 - i, -0.5 - i) for i, text in enumerate([caption, *more])]
    return CaptionResult(name, tuple(beams))


def failed(name: str) -> CaptionResult:
    return CaptionResult(name, error="corrupt or truncated image")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", ["=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)", "\tx", "'=quoted"])
def test_formula_cells_are_quoted_and_read_back(tmp_path, name):
    path = tmp_path / "out.csv"
    with RowWriter(path) as writer:
        writer.write(ok(name, "=cmd|' /C calc'!A0"))  # a stranger's vocabulary could hold such a word
    [record] = read_csv(path)
    assert record["image"] == "'" + name and record["caption"] == "'=cmd|' /C calc'!A0"
    assert float(record["log_prob"]) == -1.0  # numbers stay numbers
    with RowWriter(path, resume=True) as writer:
        assert writer.done == {name}


def test_names_that_are_not_utf8_are_escaped_and_resumable(tmp_path):
    raw = os.fsdecode(b"photo\xff.jpg")  # what os.listdir gives for such a name
    path = tmp_path / "out.jsonl"
    with RowWriter(path) as writer:
        writer.write(ok(raw))
    assert json.loads(path.read_text(encoding="utf-8"))["image"] == "photo\\xff.jpg"
    with RowWriter(path, resume=True) as writer:
        assert writer.done == {"photo\\xff.jpg"}


def test_terminal_text_cannot_forge_lines_or_colours():
    assert terminal_text("a.jpg\nerror: b.jpg: fake") == "a.jpg\\nerror: b.jpg: fake"
    assert terminal_text("\x1b[31mred.jpg") == "\\x1b[31mred.jpg"
    assert "\n" not in terminal_text(os.fsdecode(b"x\xff\ny.jpg"))


def test_an_existing_file_is_refused_and_kept(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("someone's work\n")
    with pytest.raises(OutputError, match="already exists; add --resume to continue it or --overwrite"):
        RowWriter(path)
    writer = RowWriter(path, overwrite=True)
    writer.close()  # nothing was written (say the model failed to load): the old file stays
    assert path.read_text() == "someone's work\n"
    with RowWriter(path, overwrite=True) as writer:
        writer.write(ok("a.jpg"))
    assert [r["image"] for r in read_csv(path)] == ["a.jpg"]


def test_a_second_writer_is_refused_while_the_first_writes(tmp_path):
    path = tmp_path / "out.jsonl"
    with RowWriter(path) as first:
        first.write(ok("a.jpg"))
        with pytest.raises(OutputError, match="another captioner run is writing it"):
            RowWriter(path, resume=True)
    with RowWriter(path, resume=True) as again:  # released when the first closed
        assert again.done == {"a.jpg"}


def test_resume_retries_failed_photos_and_drops_a_torn_row(tmp_path):
    path = tmp_path / "out.csv"
    with RowWriter(path) as writer:
        for result in (ok("a.jpg"), failed("b.jpg"), ok("c.jpg")):
            writer.write(result)
    with open(path, "a") as f:
        f.write("d.jpg,a torn ro")
    with RowWriter(path, resume=True) as writer:
        assert writer.done == {"a.jpg", "c.jpg"}
        writer.write(ok("b.jpg", "a cat sits"))
    records = read_csv(path)
    assert [r["image"] for r in records] == ["a.jpg", "c.jpg", "b.jpg"]  # every photo once
    assert records[-1]["caption"] == "a cat sits"


def test_resume_refuses_other_columns_from_the_first_line_alone(tmp_path):
    path = tmp_path / "big.csv"
    with open(path, "wb") as f:
        f.write(b"name,score\nalice,3\n")
        f.truncate(20 << 30)  # a 20 GB sparse file: reading it would take minutes
    start = time.perf_counter()
    with pytest.raises(OutputError, match="not a captioner output file with these columns"):
        RowWriter(path, resume=True)
    assert time.perf_counter() - start < 5
    other = tmp_path / "top1.csv"
    with RowWriter(other) as writer:
        writer.write(ok("a.jpg"))
    with pytest.raises(OutputError, match=r"--top 3"):
        RowWriter(other, top=3, resume=True)


def test_top_beams_in_both_formats():
    result = ok("a.jpg", "one", "two", "three")
    record = row(result, 3)
    assert [b["caption"] for b in record["beams"]] == ["one", "two", "three"]
    [parsed] = list(csv.DictReader(io.StringIO(results_csv([result, failed("b.jpg")], 3))))[:1]
    assert list(parsed) == csv_fields(3) and parsed["caption_3"] == "three" and parsed["score_2"] == "-1.5"


def test_rows_carry_labels_and_familiarity(tmp_path):
    seen = CaptionResult("cup.jpg", (Beam("a dog runs", -1.0, -0.5),), labels=(("espresso", 0.9), ("cup", 0.04)),
                         familiarity=0.18, familiarity_threshold=0.26)
    record = row(seen)
    assert record["familiarity"] == 0.18 and record["unfamiliar"] is True
    assert record["labels"] == [{"name": "espresso", "probability": 0.9}, {"name": "cup", "probability": 0.04}]
    [cells] = list(csv.DictReader(io.StringIO(results_csv([seen, ok("plain.jpg")]))))[:1]
    assert cells["labels"] == "espresso 0.900; cup 0.040" and cells["unfamiliar"] == "True"
    plain = row(ok("plain.jpg"))  # a model without familiarity data and an encoder without labels
    assert plain["familiarity"] is plain["unfamiliar"] is plain["labels"] is None
