"""Notebook hygiene: committed notebooks carry no outputs, no execution counts, minimal metadata,
sequential cell ids (as `nbstripout` leaves them, so diffs stay small), and a first code cell
tagged `parameters` that only assigns literals (so papermill-style runs can override it).

    python scripts/check_notebooks.py [NOTEBOOK...]         # list problems; exit 1 if any
    python scripts/check_notebooks.py --fix [NOTEBOOK...]   # strip outputs and metadata in place

Without paths it checks notebooks/*.ipynb. `--fix` cannot fix a bad parameters cell; it says so.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK_METADATA = {"kernelspec", "language_info"}
LANGUAGE_INFO = {"name": "python"}  # the rest (version, mimetype, ...) depends on who saved it last
CELL_METADATA = {"tags"}
TAGS = {"parameters"}
PARAMETERS_TAG = "parameters"


def problems(nb: nbformat.NotebookNode) -> list[str]:
    """Every hygiene problem of a notebook, one line each (empty when it is clean)."""
    found = []
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as e:
        found.append(f"not a valid notebook: {e.message}")
    extra = set(nb.metadata) - NOTEBOOK_METADATA
    if extra:
        found.append(f"notebook metadata has {', '.join(sorted(extra))}")
    if nb.metadata.get("language_info", LANGUAGE_INFO) != LANGUAGE_INFO:
        found.append(f"language_info should be just {LANGUAGE_INFO}")
    for n, cell in enumerate(nb.cells):
        where = f"cell {n}"
        if cell.get("id", str(n)) != str(n):
            found.append(f"{where}: id {cell.id!r} should be {str(n)!r} (sequential, as nbstripout writes)")
        extra = set(cell.metadata) - CELL_METADATA
        if extra:
            found.append(f"{where}: metadata has {', '.join(sorted(extra))}")
        tags = set(cell.metadata.get("tags", []))
        if tags - TAGS:
            found.append(f"{where}: unexpected tags {', '.join(sorted(tags - TAGS))}")
        if cell.cell_type == "code":
            if cell.get("outputs"):
                found.append(f"{where}: has outputs")
            if cell.get("execution_count") is not None:
                found.append(f"{where}: has an execution count")
        elif cell.get("attachments"):
            found.append(f"{where}: has attachments")
    found += _parameter_problems(nb)
    return found


def _parameter_problems(nb: nbformat.NotebookNode) -> list[str]:
    code = [(n, c) for n, c in enumerate(nb.cells) if c.cell_type == "code"]
    tagged = [n for n, c in code if PARAMETERS_TAG in c.metadata.get("tags", [])]
    if not code or tagged != [code[0][0]]:
        return [f"the first code cell, and only it, must be tagged {PARAMETERS_TAG!r}"]
    n, cell = code[0]
    try:
        statements = ast.parse(cell.source).body
    except SyntaxError as e:
        return [f"cell {n}: parameters do not parse ({e.msg}, line {e.lineno})"]
    for statement in statements:
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name) and _is_literal(statement.value)):
            return [f"cell {n}: parameters line {statement.lineno} is not `NAME = literal`"]
    return []


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except ValueError:
        return False
    return True


def parameter_names(nb: nbformat.NotebookNode) -> set[str]:
    """Names assigned in the `parameters` cell (what a run may override)."""
    cell = next(c for c in nb.cells if PARAMETERS_TAG in c.metadata.get("tags", []))
    return {s.targets[0].id for s in ast.parse(cell.source).body if isinstance(s, ast.Assign)}


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove outputs, execution counts and all metadata the checks do not allow, and number the
    cell ids 0..n-1 (in place)."""
    for key in set(nb.metadata) - NOTEBOOK_METADATA:
        del nb.metadata[key]
    if "language_info" in nb.metadata:
        nb.metadata["language_info"] = dict(LANGUAGE_INFO)
    for n, cell in enumerate(nb.cells):
        if "id" in cell:
            cell.id = str(n)
        for key in set(cell.metadata) - CELL_METADATA:
            del cell.metadata[key]
        if "tags" in cell.metadata:
            cell.metadata["tags"] = [t for t in cell.metadata["tags"] if t in TAGS]
            if not cell.metadata["tags"]:
                del cell.metadata["tags"]
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.pop("attachments", None)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--fix", action="store_true", help="strip outputs and metadata in place")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    failed = False
    for path in paths:
        try:
            nb = nbformat.read(path, as_version=4)
        except (OSError, ValueError) as e:
            print(f"{path}: unreadable ({e})")
            failed = True
            continue
        if args.fix and problems(nb):
            nbformat.write(strip(nb), path)
        for problem in problems(nb):
            print(f"{path}: {problem}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
