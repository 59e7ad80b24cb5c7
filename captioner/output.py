"""Caption results as rows: CSV and JSONL files (written as photos are done, resumable), the
app's downloads, and safe text for terminals.

Columns: image, caption, log_prob, score, familiarity, unfamiliar, labels, error; with `top` > 1
also the other beams (JSONL: a `beams` list; CSV: caption_2, log_prob_2, score_2, ... up to `top`).
Beams are ranked by `score` = log_prob / tokens**length_penalty, so the order always follows
`score`. `familiarity` and `unfamiliar` are empty when the model has no familiarity data, `labels`
(the encoder's ImageNet labels; JSONL: a list of {"name", "probability"}, CSV: `tabby 0.41; tiger
cat 0.30`) when its encoder has no ImageNet head.

Text cells of a CSV file that start with `=`, `+`, `-`, `@`, a tab or a carriage return are
written with a leading `'` (so a spreadsheet shows them as text instead of running them as a
formula), as is a cell that itself starts with `'`; reading strips that one quote again.
File names that are not valid UTF-8 are written with backslash escapes (`photo\\xff.jpg`).
"""
from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from captioner.fileio import atomic_path

if TYPE_CHECKING:  # the results come from captioner.captioner, which imports TensorFlow
    from captioner.captioner import CaptionResult

FIELDS = ("image", "caption", "log_prob", "score", "familiarity", "unfamiliar", "labels", "error")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class OutputError(ValueError):
    """An output file that cannot be written or resumed; the message names it and says why."""


def display_name(name: str | os.PathLike) -> str:
    """A file name as valid text: bytes that are not UTF-8 become `\\xNN` escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def terminal_text(text: str) -> str:
    """`text` with control characters escaped, so a file name cannot forge lines or colours."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), display_name(text))


def csv_fields(top: int = 1) -> list[str]:
    """The CSV header for `top` beams per photo."""
    return [*FIELDS, *(f"{name}_{rank}" for rank in range(2, top + 1) for name in ("caption", "log_prob", "score"))]


def row(result: CaptionResult, top: int = 1) -> dict:
    """One photo's JSON row; `beams` (best first, up to `top`) only when `top` > 1."""
    best = result.beams[0] if result.beams else None
    out = {"image": display_name(result.source), "caption": best and best.caption,
           "log_prob": best and round(best.log_prob, 4), "score": best and round(best.score, 4),
           "familiarity": None if result.familiarity is None else round(result.familiarity, 4),
           "unfamiliar": None if result.familiarity is None else result.unfamiliar,
           "labels": [{"name": name, "probability": round(p, 4)} for name, p in result.labels] or None,
           "error": result.error}
    if top > 1:
        out["beams"] = [{"caption": b.caption, "log_prob": round(b.log_prob, 4), "score": round(b.score, 4)}
                        for b in result.beams[:top]]
    return out


def csv_cells(result: CaptionResult, top: int = 1) -> list:
    """One photo's CSV cells in `csv_fields(top)` order; missing values are empty."""
    values = row(result, 1)
    values["labels"] = "; ".join(f"{name} {p:.3f}" for name, p in result.labels) or None
    cells = [values[name] for name in FIELDS]
    for beam in result.beams[1:top]:
        cells += [beam.caption, round(beam.log_prob, 4), round(beam.score, 4)]
    cells += [None] * (len(csv_fields(top)) - len(cells))
    return [_escape_cell(c) for c in cells]


def _escape_cell(value) -> object:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _unescape_cell(value: str) -> str:
    return value[1:] if value.startswith("'") and value[1:].startswith(_FORMULA_START) else value


def results_csv(results: Iterable[CaptionResult], top: int = 1) -> str:
    """A whole CSV file, as `captioner caption -o x.csv` writes it."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_fields(top))
    writer.writerows(csv_cells(r, top) for r in results)
    return buffer.getvalue()


def results_json(results: Sequence[CaptionResult], top: int, **about) -> str:
    """A JSON document: `about` (e.g. model and settings) and a row with beams per photo."""
    return json.dumps({**about, "captions": [row(r, max(top, 2)) for r in results]}, indent=2, ensure_ascii=False)


class RowWriter:
    """Appends result rows to a CSV or JSONL file, one flushed write per row, so a kill loses at
    most the row being written.

    An existing file is never lost for nothing: without `resume` or `overwrite` it is refused,
    and with `overwrite` it is replaced only when the first row is ready. A lock file beside it
    refuses a second writer. With `resume`, a torn last row is dropped, rows of photos that
    failed are removed (they are tried again) and `done` names the photos already captioned.
    """

    def __init__(self, path: str | Path, top: int = 1, resume: bool = False, overwrite: bool = False):
        self.path, self.top = Path(path), top
        self.jsonl = self.path.suffix.lower() == ".jsonl"
        if not self.jsonl and self.path.suffix.lower() != ".csv":
            raise OutputError(f"{self.path}: output must end in .csv or .jsonl")
        self._lock = self._take_lock()
        self.file: io.TextIOBase | None = None
        self.done: set[str] = set()
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists and not (resume or overwrite):
            self.close()
            raise OutputError(f"{self.path}: already exists; add --resume to continue it or --overwrite to replace it")
        if exists and resume:
            try:
                self._check_header()
                self.done = self._keep_captioned_rows()
            except Exception:
                self.close()
                raise
        self._append = exists and resume

    def _take_lock(self):
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        try:
            lock = open(lock_path, "a+")
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write beside it ({e.strerror or e})") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise OutputError(f"{self.path}: another captioner run is writing it; wait for it or choose another "
                              "output") from None
        return lock

    def _check_header(self) -> None:
        """Refuse a file of other columns before reading more than its first line."""
        with open(self.path, encoding="utf-8", errors="replace", newline="") as f:
            first = f.readline(1 << 16)
        if self.jsonl:
            try:
                keys = list(json.loads(first))
            except (ValueError, TypeError):
                keys = None
            expected = [*FIELDS, "beams"] if self.top > 1 else list(FIELDS)
        else:
            keys = next(csv.reader([first]), None)
            expected = csv_fields(self.top)
        if keys != expected:
            raise OutputError(f"{self.path}: not a captioner output file with these columns (--top {self.top}), "
                              "cannot resume it; choose another output")

    def _keep_captioned_rows(self) -> set[str]:
        """Rewrite the file without a torn last row and without failed photos; the captioned ones."""
        done, kept, dropped = set(), [], 0
        with open(self.path, encoding="utf-8", errors="replace", newline="") as f:
            lines = f.read().splitlines(keepends=True) if not self.jsonl else f.readlines()
        if self.jsonl:
            complete = [line for line in lines if line.endswith("\n")]
            dropped = len(lines) - len(complete)
            for line in complete:
                try:
                    values = json.loads(line)
                except ValueError:
                    values = None
                if not isinstance(values, dict) or not isinstance(values.get("image"), str):
                    raise OutputError(f"{self.path}: a row is not a captioner result, cannot resume it")
                if values.get("caption") is None:
                    dropped += 1
                    continue
                done.add(values["image"])
                kept.append(line)
        else:
            text = "".join(lines)
            if text and not text.endswith("\n"):  # killed mid-row: keep complete rows only
                text, dropped = text[: text.rfind("\n") + 1], 1
            reader = csv.reader(io.StringIO(text))
            kept.append(_csv_line(next(reader)))
            for cells in reader:
                if len(cells) < len(FIELDS) or not cells[1]:
                    dropped += 1
                    continue
                done.add(_unescape_cell(cells[0]))
                kept.append(_csv_line(cells))
        if dropped:
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(kept), encoding="utf-8")
        return done

    def write(self, result: CaptionResult) -> None:
        if self.file is None:  # only now may an old file be replaced
            self.file = open(self.path, "a" if self._append else "w", encoding="utf-8", newline="")
            if not self._append and not self.jsonl:
                self.file.write(_csv_line(csv_fields(self.top)))
        if self.jsonl:
            line = json.dumps(row(result, self.top), ensure_ascii=False) + "\n"
        else:
            line = _csv_line(csv_cells(result, self.top))
        self.file.write(line)
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None
        if self._lock is not None:
            self._lock.close()  # releases the lock; the empty lock file may stay
            self._lock = None

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _csv_line(cells: Sequence) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue()
