"""Captioned-image datasets in the layouts people download: Flickr8k, the Kaggle re-pack, Karpathy JSON.

Each reader only gathers raw entries (image files, captions, split lists); `_Builder` does all the
filtering and reporting, so every layout skips the same bad entries the same way and says so once.

Image ids are file names (`1000268201_693b08cb0e.jpg`), or `filepath/filename` for Karpathy entries
that give a `filepath`, so Flickr8k ids agree across the three layouts.

Where the train/dev/test split comes from (recorded in `CaptionDataset.split_source`, logged at INFO):
the dataset's own split (`Flickr_8k.*Images.txt` files, or the Karpathy JSON `split` field) when it
has one. Otherwise (the Kaggle re-pack, a Karpathy JSON without `split`, a Flickr8k folder without
split files) a fallback: when (nearly) all image names are Flickr8k's, the official Flickr8k lists
shipped in `captioner/assets/splits/` (names in no list, e.g. the 91 extra Kaggle photos, stay in no
split); else a 90/5/5 split by a hash of the file name, stable but not comparable with any published
result. Photos for Karpathy entries are looked up beside the JSON, or under `images=`.
"""
from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TextIO

from captioner.images import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
LAYOUTS = ("flickr8k", "kaggle", "karpathy")

FLICKR_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset")  # the official name has the typo
FLICKR_TEXT_DIRS = ("Flickr8k_text", ".")  # some people unpack the text zip into the root
TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {split: f"Flickr_8k.{split}Images.txt" for split in SPLITS}
KAGGLE_IMAGE_DIRS = ("Images", "images")
KAGGLE_CAPTIONS = "captions.txt"
KAGGLE_TRAIN, KAGGLE_DEV = 0.90, 0.05  # hash-based split fractions; test gets the rest
KARPATHY_GLOB = "dataset_*.json"
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "dev", "dev": "dev", "test": "test"}
# where Karpathy entries without a filepath are looked for, under the JSON's folder or `images=`:
# Kaggle and official Flickr8k folders, and Flickr30k's own, Kaggle-style nested one included
PHOTO_DIRS = (
    *KAGGLE_IMAGE_DIRS, ".", *FLICKR_IMAGE_DIRS,
    "flickr30k-images", "flickr30k_images", "flickr30k_images/flickr30k_images",
)
FLICKR8K_SPLITS_ASSET = "assets/splits/flickr8k.json.gz"  # in the captioner package
FLICKR8K_MATCH = 0.95  # share of image names in the shipped lists for a dataset to count as Flickr8k

# CaptionDataset.split_source values (the split-files one also names the splits it found)
SOURCE_SPLIT_FILES = "Flickr_8k.*Images.txt files"
SOURCE_KARPATHY = "Karpathy JSON 'split' field"
SOURCE_SHIPPED = "official Flickr8k split lists (shipped)"
SOURCE_HASH = "hash of the file name 90/5/5 (not comparable with published results)"

_LOOKED_FOR = (
    f"{FLICKR_IMAGE_DIRS[0]}/ with Flickr8k_text/{TOKEN_FILE}, "
    f"{KAGGLE_IMAGE_DIRS[0]}/ with {KAGGLE_CAPTIONS}, or {KARPATHY_GLOB}"
)


class DatasetError(ValueError):
    """A dataset cannot be read at all; the one-line message names the path and the reason."""


@dataclass
class CaptionDataset:
    """Images with their raw captions and the train/dev/test split.

    `images` and `captions` have the same keys: every image has a file and at least one caption.
    Images that no split names (e.g. Flickr8k images missing from every split file) are kept in
    `images`/`captions` but are in no split. `splits` always has the three keys of `SPLITS`; each
    list is sorted, the lists are disjoint, and a split the data does not define is empty.
    `problems` has one line per kind of skipped entry, with a count and one example.
    `split_source` says where the split came from (one of the `SOURCE_*` texts, see the module
    docstring); `name` is the dataset's name ("flickr8k", "flickr30k", "coco", or the folder's).
    """

    root: Path
    images: dict[str, Path]
    captions: dict[str, list[str]]
    splits: dict[str, list[str]]
    layout: str
    problems: list[str] = field(default_factory=list)
    split_source: str = ""
    name: str = ""

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> dict:
        """Name, layout, split source and image counts per split: what a trained model records
        about its data instead of a machine's path."""
        counts = {split: len(self.splits.get(split, ())) for split in SPLITS}
        counts["unsplit"] = len(self.images) - sum(counts.values())
        return {
            "name": self.name or self.root.name,
            "layout": self.layout,
            "split_source": self.split_source,
            "images": counts,
        }

    def subset(self, split: str) -> CaptionDataset:
        """The images of one split only; ValueError naming the available splits if it is empty."""
        ids = self.splits.get(split)
        if not ids:
            available = ", ".join(s for s in SPLITS if self.splits.get(s)) or "none"
            raise ValueError(f"{self.root}: no images in split {split!r} (available: {available})")
        return replace(
            self,
            images={i: self.images[i] for i in ids},
            captions={i: list(self.captions[i]) for i in ids},
            splits={s: list(ids) if s == split else [] for s in SPLITS},
            problems=list(self.problems),
        )


def load_dataset(
    root: str | Path, layout: str = "auto", images: str | Path | None = None
) -> CaptionDataset:
    """Read the dataset at `root` (a folder, or a Karpathy `dataset_*.json` file).

    `layout` is "auto" (detect from the files present; DatasetError if several layouts are) or one
    of `LAYOUTS` to force a reader. `images` is a folder holding the photos when they are not in
    `root` (e.g. COCO's, with train2014/ and val2014/): Karpathy `filepath/filename` and plain
    `filename` entries are resolved against it, and the Flickr8k/Kaggle readers take their photos
    from it. Bad entries are skipped, listed in `problems` and logged as one warning; DatasetError
    if nothing usable is found. The result's `root` is the resolved folder (for a JSON path, the
    folder holding it). One INFO line names the layout read and where the split came from.
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected 'auto' or one of {', '.join(LAYOUTS)}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"{root}: no such file or directory")
    root = root.resolve()
    photo_root = None
    if images is not None:
        photo_root = Path(images).expanduser()
        if not photo_root.is_dir():
            raise DatasetError(f"{photo_root}: no such folder (given as the photo folder, images=)")
        photo_root = photo_root.resolve()
    dataset = _READERS[_detect(root, photo_root) if layout == "auto" else layout](root, photo_root)
    if dataset.problems:
        logger.warning("%s: skipped entries: %s", root, "; ".join(dataset.problems))
    counts = dataset.describe()["images"]
    logger.info(
        "%s: read as %s layout: %d images (train %d, dev %d, test %d, in no split %d); split: %s",
        root, dataset.layout, len(dataset), counts["train"], counts["dev"], counts["test"],
        counts["unsplit"], dataset.split_source,
    )
    return dataset


def _detect(root: Path, photo_root: Path | None) -> str:
    """The one layout present at `root`; DatasetError when there is none, or several to choose from."""
    if root.is_file():
        if root.suffix.lower() == ".json":
            return "karpathy"
        raise DatasetError(f"{root}: not a dataset folder or Karpathy .json file")
    found: dict[str, str] = {}  # layout -> the files that gave it away
    token_file = _find_text_file(root, TOKEN_FILE)
    flickr_dir = _first_dir(root, FLICKR_IMAGE_DIRS)
    if token_file and (flickr_dir or photo_root):
        photos = f"{flickr_dir.name}/ + " if flickr_dir else ""
        found["flickr8k"] = photos + token_file.relative_to(root).as_posix()
    kaggle_dir = _first_dir(root, KAGGLE_IMAGE_DIRS)
    if (root / KAGGLE_CAPTIONS).is_file() and (kaggle_dir or photo_root):
        found["kaggle"] = (f"{kaggle_dir.name}/ + " if kaggle_dir else "") + KAGGLE_CAPTIONS
    karpathy = sorted(p.name for p in root.glob(KARPATHY_GLOB))
    if karpathy:
        found["karpathy"] = ", ".join(karpathy)
    if not found:
        raise DatasetError(f"{root}: no captioned-image dataset found (looked for {_LOOKED_FOR})")
    if len(found) > 1:
        # guessing here would silently pick the photos, captions and split the user did not mean
        what = ", ".join(f"{name} ({files})" for name, files in found.items())
        choices = " or ".join(f"layout={name!r}" for name in found)
        raise DatasetError(
            f"{root}: several dataset layouts found: {what}; pass {choices} (--layout on the command line)"
        )
    return next(iter(found))


# ----------------------------------------------------------------------------- readers


def _read_flickr8k(root: Path, photo_root: Path | None = None) -> CaptionDataset:
    image_dir = _photo_dir(root, photo_root, FLICKR_IMAGE_DIRS)
    token_file = _find_text_file(root, TOKEN_FILE)
    if image_dir is None or token_file is None:
        raise DatasetError(
            f"{root}: not a Flickr8k folder (needs {FLICKR_IMAGE_DIRS[0]}/ and Flickr8k_text/{TOKEN_FILE})"
        )
    shown = _shown(image_dir, root)
    builder = _Builder(root, "flickr8k", _list_images(image_dir), f"not in {shown}", shown)
    source = token_file.name
    for line_no, line in enumerate(_read_lines(token_file), 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        if not tab:
            builder.problems.add(source, "line", "without a tab", f"line {line_no}: {line[:40]!r}")
            continue
        key = key.strip()
        image_id = key.rpartition("#")[0] or key  # "<image>#<n>"; tolerate a missing "#<n>"
        builder.add_caption(source, image_id, caption, f"line {line_no}: {key}")
    return builder.build(*_own_or_fallback_splits(root, builder), name="flickr8k")


def _read_kaggle(root: Path, photo_root: Path | None = None) -> CaptionDataset:
    image_dir = _photo_dir(root, photo_root, KAGGLE_IMAGE_DIRS)
    csv_path = root / KAGGLE_CAPTIONS
    if image_dir is None or not csv_path.is_file():
        raise DatasetError(
            f"{root}: not a Kaggle Flickr folder (needs {KAGGLE_IMAGE_DIRS[0]}/ and {KAGGLE_CAPTIONS})"
        )
    shown = _shown(image_dir, root)
    builder = _Builder(root, "kaggle", _list_images(image_dir), f"not in {shown}", shown)
    source = csv_path.name
    # newline="" lets the csv module handle quoted newlines and any of CR, LF, CRLF itself
    with _open_text(csv_path, newline="") as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                cells = [c.strip() for c in row]
                where = f"line {reader.line_num}: {cells[0] if cells else ''}"
                if reader.line_num == 1 and [c.lower() for c in cells] == ["image", "caption"]:
                    continue
                if not any(cells):
                    continue
                if len(row) < 2:
                    builder.problems.add(source, "row", "without a caption", where)
                    continue
                # an unquoted caption with commas arrives split into several cells: rejoin it
                builder.add_caption(source, cells[0], ",".join(row[1:]), where)
        except csv.Error as e:
            raise DatasetError(f"{csv_path}: line {reader.line_num}: {e}") from None
    split_lists, split_source = _own_or_fallback_splits(root, builder)
    # the re-pack of Flickr8k is the common case; any other re-pack is named after its folder
    name = "flickr8k" if split_source != SOURCE_HASH else root.name
    return builder.build(split_lists, split_source, name=name)


def _read_karpathy(root: Path, photo_root: Path | None = None) -> CaptionDataset:
    json_path = root if root.is_file() else _find_karpathy_json(root)
    base = json_path.parent
    entries, dataset_name = _load_karpathy_entries(json_path)
    source = json_path.name
    where = photo_root or base
    listings: dict[Path, dict[str, Path]] = {}

    def find(folder: Path, filename: str) -> Path | None:
        if folder not in listings:  # one scandir per folder however many entries point into it
            listings[folder] = _list_images(folder) if folder.is_dir() else {}
        return listings[folder].get(filename)

    # first pass: each entry's relative path, so the "not found" reason can name the folders searched
    parsed: list[tuple[int, dict, PurePosixPath | None]] = []
    for n, entry in enumerate(entries):
        filename = entry.get("filename") if isinstance(entry, dict) else None
        relative = None
        if isinstance(filename, str) and filename.strip():
            filepath = entry.get("filepath")
            relative = PurePosixPath(filepath if isinstance(filepath, str) else "", filename)
        parsed.append((n, entry, relative))
    searched = []
    if any(r is not None and not r.parent.parts for _, _, r in parsed):
        subdirs = ", ".join(f"{d}/" for d in PHOTO_DIRS if d != ".")
        searched.append(f"{where}/ and its {subdirs}")
    if any(r is not None and r.parent.parts for _, _, r in parsed):
        searched.append(f"{where}/<filepath>/")
    missing = f"not found (searched {'; '.join(searched)}; pass images= if the photos are elsewhere)"

    # the builder's file table grows entry by entry: each image is registered before its captions
    builder = _Builder(base, "karpathy", {}, missing, source)
    split_ids: dict[str, list[str]] = {split: [] for split in SPLITS}
    without_split: list[str] = []
    seen: set[str] = set()
    for n, entry, relative in parsed:
        if relative is None:
            builder.problems.add(source, "image", "without a filename", f"images[{n}]")
            continue
        image_id = relative.as_posix()
        if image_id in seen:
            builder.problems.add(source, "image", "listed again (later entries skipped)", image_id)
            continue
        seen.add(image_id)
        folders = [where / relative.parent] if relative.parent.parts else [where / d for d in PHOTO_DIRS]
        path = next((p for p in (find(d, relative.name) for d in folders) if p is not None), None)
        if path is not None:
            builder.files[image_id] = path
        sentences = entry.get("sentences")
        for k, sentence in enumerate(sentences if isinstance(sentences, list) else []):
            builder.add_caption(source, image_id, _sentence_text(sentence), f"images[{n}].sentences[{k}]")
        raw_split = entry.get("split")
        split = KARPATHY_SPLITS.get(raw_split) if isinstance(raw_split, str) else None
        if raw_split is None:  # no split at all: the fallback below, like the other layouts
            without_split.append(image_id)
        elif split is None:
            example = f"{image_id}: {raw_split!r}"
            reason = "with an unknown split (kept, in no split)"
            builder.problem_if_kept(image_id, source, "image", reason, example)
        else:
            split_ids[split].append(image_id)

    split_source = SOURCE_KARPATHY
    kept_without = [i for i in without_split if i in builder.captions]
    if kept_without:
        fallback_source, fallback = _fallback_splits(kept_without)
        for split in SPLITS:
            split_ids[split] += fallback[split]
        if len(kept_without) == len(builder.captions):
            split_source = f"{fallback_source}; the JSON has no 'split' field"
        else:
            without = _plural(len(kept_without), "image")
            split_source = f"{SOURCE_KARPATHY}; {without} without one: {fallback_source}"
    if not dataset_name:  # Karpathy's files name the dataset; else take it from dataset_<name>.json
        dataset_name = json_path.stem.removeprefix("dataset_") or base.name
    split_lists = {split: (source, ids) for split, ids in split_ids.items()}
    return builder.build(split_lists, split_source, dataset_name)


def _own_or_fallback_splits(
    root: Path, builder: _Builder
) -> tuple[dict[str, tuple[str, list[str]]], str]:
    """(split lists, split source): the Flickr_8k.*Images.txt lists in `root` if there are any,
    else the fallback split of the images kept so far."""
    lists = _read_split_files(root)
    if lists:
        return lists, f"{SOURCE_SPLIT_FILES} ({', '.join(lists)})"
    split_source, fallback = _fallback_splits(builder.captions)
    return {split: ("", ids) for split, ids in fallback.items()}, split_source


def _fallback_splits(ids: Iterable[str]) -> tuple[str, dict[str, list[str]]]:
    """(split source, split -> ids) for images whose dataset defines no split.

    The official Flickr8k lists when at least `FLICKR8K_MATCH` of the names are in them (names in
    no list get no split), so scores stay comparable with published ones; else the hash split.
    """
    ids = list(ids)
    official = _flickr8k_split_of()
    known = [i for i in ids if PurePosixPath(i).name in official]
    if ids and len(known) >= FLICKR8K_MATCH * len(ids):
        split_of = {i: official[PurePosixPath(i).name] for i in known}
        return SOURCE_SHIPPED, {split: [i for i in known if split_of[i] == split] for split in SPLITS}
    return SOURCE_HASH, {split: [i for i in ids if _hash_split(i) == split] for split in SPLITS}


@functools.lru_cache(maxsize=1)
def _flickr8k_split_of() -> dict[str, str]:
    """Image name -> split of the official Flickr8k lists shipped with the package."""
    asset = resources.files("captioner").joinpath(FLICKR8K_SPLITS_ASSET)
    lists = json.loads(gzip.decompress(asset.read_bytes()).decode("utf-8"))
    return {name: split for split in SPLITS for name in lists[split]}


_READERS: dict[str, Callable[[Path, Path | None], CaptionDataset]] = {
    "flickr8k": _read_flickr8k,
    "kaggle": _read_kaggle,
    "karpathy": _read_karpathy,
}


# ----------------------------------------------------------------------------- shared filtering


@dataclass
class _Kind:
    example: str
    count: int = 0
    images: set[str] = field(default_factory=set)


class _Problems:
    """Counts skipped entries per kind and keeps the first example, for one report line per kind."""

    def __init__(self) -> None:
        self._kinds: dict[tuple[str, str, str], _Kind] = {}  # (source, noun, reason), first seen first

    def add(self, source: str, noun: str, reason: str, example: str, image: str | None = None) -> None:
        """Count one skipped `noun` of `source`; give `image` to also count the distinct images."""
        kind = self._kinds.setdefault((source, noun, reason), _Kind(example))
        kind.count += 1
        if image is not None:
            kind.images.add(image)

    def lines(self) -> list[str]:
        lines = []
        for (source, noun, reason), kind in self._kinds.items():
            what = _plural(kind.count, noun)
            if kind.images:
                what += f" of {_plural(len(kind.images), 'image')}"
            lines.append(f"{source}: {' '.join(filter(None, [what, reason]))} (e.g. {kind.example})")
        return lines


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class _Builder:
    """Checks raw caption and split entries against the image files and assembles the dataset."""

    def __init__(
        self, root: Path, layout: str, files: dict[str, Path], missing_reason: str, uncaptioned_source: str
    ) -> None:
        self.root, self.layout, self.files = root, layout, files
        self.missing_reason = missing_reason  # e.g. "not in Flicker8k_Dataset"
        self.uncaptioned_source = uncaptioned_source  # where images without captions are reported
        self.captions: dict[str, list[str]] = {}
        self.problems = _Problems()
        self._missing: set[str] = set()  # ids with captions but no file, already reported
        self._seen: set[tuple[str, str]] = set()
        self._if_kept: list[tuple[str, tuple[str, str, str, str]]] = []  # see problem_if_kept

    def problem_if_kept(self, image_id: str, source: str, noun: str, reason: str, example: str) -> None:
        """Report `image_id` only if it ends up in the dataset: a skipped image is reported once,
        for why it was skipped, not again for a detail that no longer matters (its split, say)."""
        self._if_kept.append((image_id, (source, noun, reason, example)))

    def add_caption(self, source: str, image_id: str, caption: str, where: str) -> None:
        """Keep `caption` unless it is blank, its image has no file, or it repeats one already kept."""
        caption = caption.strip()
        if not caption:
            self.problems.add(source, "blank caption", "", where)
        elif image_id not in self.files:
            self._missing.add(image_id)
            self.problems.add(source, "caption", self.missing_reason, image_id, image=image_id)
        elif (image_id, caption) in self._seen:
            self.problems.add(source, "caption", "identical to an earlier caption of the same image", where)
        else:
            self._seen.add((image_id, caption))
            self.captions.setdefault(image_id, []).append(caption)

    def build(
        self, split_lists: dict[str, tuple[str, Iterable[str]]], split_source: str, name: str = ""
    ) -> CaptionDataset:
        """Assemble the dataset; `split_lists` maps a split to (source name, image ids), and
        `split_source` says where those lists came from."""
        reported = set(self._missing)
        for image_id in sorted(self.files.keys() - self.captions.keys()):
            self.problems.add(self.uncaptioned_source, "image", "without captions", image_id)
            reported.add(image_id)
        for image_id, problem in self._if_kept:
            if image_id in self.captions:
                self.problems.add(*problem)
        split_of: dict[str, str] = {}
        for split in SPLITS:  # on a clash the earlier split keeps the image
            source, ids = split_lists.get(split, ("", ()))
            for image_id in ids:
                earlier = split_of.get(image_id)
                if earlier is not None:
                    reason = "listed twice" if earlier == split else f"also in the {earlier} split"
                    self.problems.add(source, "image", reason, image_id)
                elif image_id in self.captions:
                    split_of[image_id] = split
                elif image_id not in reported:
                    self.problems.add(source, "image", "without an image file or captions", image_id)
        if not self.captions:
            problems = self.problems.lines()
            detail = f" ({problems[0]})" if problems else ""
            raise DatasetError(f"{self.root}: no image has both a file and a caption{detail}")
        ids = sorted(self.captions)
        return CaptionDataset(
            root=self.root,
            images={i: self.files[i] for i in ids},
            captions={i: self.captions[i] for i in ids},
            splits={split: [i for i in ids if split_of.get(i) == split] for split in SPLITS},
            layout=self.layout,
            problems=self.problems.lines(),
            split_source=split_source,
            name=name,
        )


# ----------------------------------------------------------------------------- file helpers


def _list_images(folder: Path) -> dict[str, Path]:
    """Image files of `folder` by name, from a single scandir (no stat per file)."""
    with os.scandir(folder) as it:
        return {
            e.name: Path(e.path)
            for e in it
            if not e.name.startswith(".")  # macOS "._x.jpg" resource forks are not images
            and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
            and e.is_file()
        }


def _open_text(path: Path, newline: str | None = None) -> TextIO:
    """Open a text file tolerating a UTF-8 BOM and stray bad bytes (shown as U+FFFD)."""
    try:
        return open(path, encoding="utf-8-sig", errors="replace", newline=newline)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from None


def _read_lines(path: Path) -> list[str]:
    # universal newlines turn CRLF and lone CR into "\n"; str.splitlines would also split on
    # exotic separators such as U+2028 inside a caption
    with _open_text(path) as f:
        return f.read().split("\n")


def _shown(path: Path, root: Path) -> str:
    """`path` as a problem line shows it: relative to the dataset root when inside it (the log line
    names the root), else in full."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _photo_dir(root: Path, photo_root: Path | None, names: tuple[str, ...]) -> Path | None:
    """The layout's photo folder: one of `names` in `root`, or in `photo_root` (or that folder
    itself) when the user gave one."""
    if photo_root is None:
        return _first_dir(root, names)
    return _first_dir(photo_root, (*names, "."))


def _first_dir(root: Path, names: Iterable[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _find_text_file(root: Path, name: str) -> Path | None:
    return next((root / d / name for d in FLICKR_TEXT_DIRS if (root / d / name).is_file()), None)


def _read_split_files(root: Path) -> dict[str, tuple[str, list[str]]]:
    """The Flickr_8k.<split>Images.txt lists present, as split -> (file name, image ids)."""
    splits = {}
    for split, name in SPLIT_FILES.items():
        path = _find_text_file(root, name)
        if path is not None:
            splits[split] = (name, [line.strip() for line in _read_lines(path) if line.strip()])
    return splits


def _hash_split(image_id: str) -> str:
    """A split fixed by the image name alone, so adding images never moves the others."""
    u = int.from_bytes(hashlib.sha1(image_id.encode("utf-8")).digest()[:8], "big") / 2**64
    return "train" if u < KAGGLE_TRAIN else "dev" if u < KAGGLE_TRAIN + KAGGLE_DEV else "test"


def _find_karpathy_json(root: Path) -> Path:
    found = sorted(root.glob(KARPATHY_GLOB))
    if not found:
        raise DatasetError(f"{root}: no Karpathy {KARPATHY_GLOB} file")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DatasetError(f"{root}: several Karpathy files ({names}); pass the one to use as the path")
    return found[0]


def _load_karpathy_entries(path: Path) -> tuple[list, str]:
    """The JSON's `images` list, and its `dataset` name ("flickr8k", "flickr30k", "coco") or ""."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig", errors="replace"))
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DatasetError(f'{path}: not a Karpathy caption file (no "images" list)')
    name = data.get("dataset")
    return entries, name.strip() if isinstance(name, str) else ""


def _sentence_text(sentence: object) -> str:
    """A Karpathy sentence's `raw` text, else its tokens joined; "" (reported blank) otherwise."""
    if not isinstance(sentence, dict):
        return ""
    raw = sentence.get("raw")
    if isinstance(raw, str) and raw.strip():
        return raw
    tokens = sentence.get("tokens")
    if isinstance(tokens, list):
        return " ".join(t for t in tokens if isinstance(t, str))
    return ""
