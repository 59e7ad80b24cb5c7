"""Dataset readers on tiny hand-made copies of each layout, edge cases included."""
from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner.data import SPLITS, CaptionDataset, DatasetError, load_dataset

BOGUS = "2258277193_586949ec62.jpg.1"


def write_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path)
    return path


def write_text(path: Path, lines: list[str], newline: str = "\n", bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("\ufeff" if bom else "") + newline.join(lines) + newline
    path.write_bytes(text.encode("utf-8"))


def problem(ds: CaptionDataset, *fragments: str) -> str:
    """The one problem line containing all `fragments` (fails if there is not exactly one)."""
    found = [p for p in ds.problems if all(f in p for f in fragments)]
    assert len(found) == 1, (fragments, ds.problems)
    return found[0]


# ----------------------------------------------------------------------------- Flickr8k


def make_flickr8k(root: Path, image_dir: str = "Flicker8k_Dataset", newline: str = "\r\n") -> Path:
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"):
        write_image(root / image_dir / name)
    (root / image_dir / "notes.txt").write_text("not an image")
    text = root / "Flickr8k_text"
    write_text(
        text / "Flickr8k.token.txt",
        [
            "a.jpg#0\tA dog runs .",
            "a.jpg#1\tA brown dog running on grass .",
            "a.jpg#0\tA dog runs .",  # duplicate line
            "b.jpg#0\tTwo kids play .",
            "b.jpg#1\t   ",  # blank caption
            "c.jpg#0\tA café in the city \u2028 at night .",  # non-ASCII, odd separator inside
            "d.jpg#0\tA man sits .",  # d is in no split file
            "this line has no tab",
            "",
            *(f"{BOGUS}#{i}\tA caption of a missing image ." for i in range(5)),
            # e.jpg has no captions at all
        ],
        newline=newline,
        bom=True,
    )
    write_text(text / "Flickr_8k.trainImages.txt", ["a.jpg", "b.jpg"], newline=newline)
    write_text(text / "Flickr_8k.devImages.txt", ["c.jpg", ""], newline=newline)
    return root  # no test split file: that split is just empty


def test_flickr8k_reads_images_captions_and_splits(tmp_path):
    ds = load_dataset(make_flickr8k(tmp_path))
    assert ds.layout == "flickr8k" and ds.root == tmp_path.resolve()
    assert sorted(ds.images) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"] and len(ds) == 4
    assert ds.captions.keys() == ds.images.keys()
    assert ds.captions["a.jpg"] == ["A dog runs .", "A brown dog running on grass ."]
    assert ds.captions["b.jpg"] == ["Two kids play ."]
    assert ds.captions["c.jpg"] == ["A café in the city \u2028 at night ."]
    assert all(p.is_absolute() and p.is_file() for p in ds.images.values())
    assert ds.splits == {"train": ["a.jpg", "b.jpg"], "dev": ["c.jpg"], "test": []}


def test_flickr8k_reports_each_kind_of_skipped_entry_once(tmp_path):
    ds = load_dataset(make_flickr8k(tmp_path))
    line = problem(ds, "Flickr8k.token.txt", "5 captions of 1 image not in Flicker8k_Dataset")
    assert BOGUS in line
    problem(ds, "Flickr8k.token.txt", "1 blank caption", "b.jpg#1")
    problem(ds, "Flickr8k.token.txt", "1 line without a tab")
    problem(ds, "Flickr8k.token.txt", "1 caption identical to an earlier caption", "a.jpg#0")
    problem(ds, "Flicker8k_Dataset", "1 image without captions", "e.jpg")
    assert len(ds.problems) == 5


def test_problems_are_logged_as_one_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="captioner.data"):
        load_dataset(make_flickr8k(tmp_path))
    assert len(caplog.records) == 1 and BOGUS in caplog.records[0].getMessage()


@pytest.mark.parametrize("newline", ["\n", "\r"])
def test_flickr8k_other_line_endings_and_folder_spelling(tmp_path, newline):
    ds = load_dataset(make_flickr8k(tmp_path, image_dir="Flickr8k_Dataset", newline=newline))
    assert sorted(ds.images) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert ds.splits["train"] == ["a.jpg", "b.jpg"]


def test_flickr8k_bad_split_entries_are_reported(tmp_path):
    root = make_flickr8k(tmp_path)
    test_list = ["a.jpg", "zzz.jpg", "d.jpg", "d.jpg", BOGUS]
    write_text(root / "Flickr8k_text" / "Flickr_8k.testImages.txt", test_list)
    ds = load_dataset(root)
    assert ds.splits == {"train": ["a.jpg", "b.jpg"], "dev": ["c.jpg"], "test": ["d.jpg"]}
    problem(ds, "Flickr_8k.testImages.txt", "1 image also in the train split", "a.jpg")
    problem(ds, "Flickr_8k.testImages.txt", "1 image without an image file or captions", "zzz.jpg")
    problem(ds, "Flickr_8k.testImages.txt", "1 image listed twice", "d.jpg")
    # the bogus image is reported once, by the token file, not again by the split file
    assert not [p for p in ds.problems if "testImages" in p and BOGUS in p]


def test_subset_keeps_one_split_and_explains_empty_ones(tmp_path):
    ds = load_dataset(make_flickr8k(tmp_path))
    train = ds.subset("train")
    assert sorted(train.images) == sorted(train.captions) == ["a.jpg", "b.jpg"] and len(train) == 2
    assert train.splits["train"] == ["a.jpg", "b.jpg"] and not train.splits["dev"]
    assert len(ds) == 4  # the original is untouched
    with pytest.raises(ValueError, match=r"'test'.*available: train, dev"):
        ds.subset("test")
    with pytest.raises(ValueError, match="available"):
        ds.subset("validation")


# ----------------------------------------------------------------------------- Kaggle


def make_kaggle(root: Path, names: list[str], extra_rows: list[list[str]] = ()) -> Path:
    for name in names:
        write_image(root / "Images" / name)
    with open(root / "captions.txt", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for name in names:
            w.writerow([name, f"A photo of {name} ."])
        w.writerows(extra_rows)
    return root


def test_kaggle_csv_quoting_and_bad_rows(tmp_path):
    tricky = 'A dog, brown and white, says "woof" .'
    root = make_kaggle(
        tmp_path,
        ["x.jpg", "y.jpg"],
        [["x.jpg", tricky], ["y.jpg", ""], ["gone.jpg", "Nothing here ."], ["y.jpg"]],
    )
    with open(root / "captions.txt", "a", encoding="utf-8") as f:
        f.write("y.jpg,an unquoted caption, with a comma\n")
    ds = load_dataset(root)
    assert ds.layout == "kaggle"
    assert ds.captions["x.jpg"] == ["A photo of x.jpg .", tricky]
    assert ds.captions["y.jpg"] == ["A photo of y.jpg .", "an unquoted caption, with a comma"]
    problem(ds, "captions.txt", "1 blank caption")
    problem(ds, "captions.txt", "1 caption of 1 image not in Images", "gone.jpg")
    problem(ds, "captions.txt", "1 row without a caption")
    assert len(ds.problems) == 3


def test_kaggle_splits_are_a_stable_hash_of_the_name(tmp_path):
    names = [f"{i:04d}.jpg" for i in range(200)]
    ds = load_dataset(make_kaggle(tmp_path / "small", names))
    assert sorted(sum(ds.splits.values(), [])) == sorted(ds.images)  # every image, exactly once
    assert 0.8 < len(ds.splits["train"]) / 200 < 0.97 and ds.splits["dev"] and ds.splits["test"]
    bigger = load_dataset(make_kaggle(tmp_path / "big", names + [f"new{i}.jpg" for i in range(50)]))
    for split in SPLITS:
        assert [i for i in bigger.splits[split] if not i.startswith("new")] == ds.splits[split]


def test_kaggle_uses_flickr_split_files_when_present(tmp_path):
    root = make_kaggle(tmp_path, ["x.jpg", "y.jpg", "z.jpg"])
    write_text(root / "Flickr_8k.trainImages.txt", ["x.jpg", "y.jpg"])
    write_text(root / "Flickr_8k.testImages.txt", ["z.jpg"])
    assert load_dataset(root).splits == {"train": ["x.jpg", "y.jpg"], "dev": [], "test": ["z.jpg"]}


def test_kaggle_bom_and_crlf(tmp_path):
    write_image(tmp_path / "Images" / "x.jpg")
    rows = ["image,caption", 'x.jpg,"Hi, there"', "x.jpg,Bye"]
    write_text(tmp_path / "captions.txt", rows, newline="\r\n", bom=True)
    ds = load_dataset(tmp_path)
    assert ds.captions == {"x.jpg": ["Hi, there", "Bye"]} and not ds.problems


@settings(max_examples=30, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1).filter(lambda s: s.strip()))
def test_kaggle_captions_round_trip_through_csv(caption):
    with tempfile.TemporaryDirectory() as tmp:
        ds = load_dataset(make_kaggle(Path(tmp), ["x.jpg"], [["x.jpg", caption]]))
        assert caption.strip() in ds.captions["x.jpg"]


# ----------------------------------------------------------------------------- Karpathy


def sentence(raw: str, tokens: list[str] | None = None) -> dict:
    return {"raw": raw, "tokens": raw.lower().split() if tokens is None else tokens}


def make_karpathy(root: Path) -> Path:
    write_image(root / "Images" / "tr.jpg")
    write_image(root / "Flickr8k_Dataset" / "va.png")
    write_image(root / "rv.jpg")  # in the root itself
    write_image(root / "Flicker8k_Dataset" / "te.jpg")
    write_image(root / "val2014" / "coco.jpg")
    images = [
        {"filename": "tr.jpg", "split": "train", "sentences": [sentence("A cat ."), sentence("", ["a", "pet"])]},
        {"filename": "va.png", "split": "val", "sentences": [sentence("A dog .")]},
        {"filename": "rv.jpg", "split": "restval", "sentences": [sentence("A bird ."), sentence("  ", [])]},
        {"filename": "te.jpg", "split": "test", "sentences": [sentence("A fish .")]},
        {"filepath": "val2014", "filename": "coco.jpg", "split": "val", "sentences": [sentence("A cow .")]},
        {"filename": "lost.jpg", "split": "train", "sentences": [sentence("Gone ."), sentence("Gone too .")]},
        {"split": "train", "sentences": [sentence("No file name .")]},
    ]
    path = root / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}), encoding="utf-8")
    return path


def test_karpathy_paths_split_names_and_caption_text(tmp_path):
    make_karpathy(tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.layout == "karpathy"
    assert ds.splits["train"] == ["rv.jpg", "tr.jpg"]  # restval is training data
    assert ds.splits["dev"] == ["va.png", "val2014/coco.jpg"]
    assert ds.splits["test"] == ["te.jpg"]
    assert ds.images["tr.jpg"] == tmp_path.resolve() / "Images" / "tr.jpg"
    assert ds.images["va.png"] == tmp_path.resolve() / "Flickr8k_Dataset" / "va.png"
    assert ds.images["rv.jpg"] == tmp_path.resolve() / "rv.jpg"
    assert ds.images["te.jpg"] == tmp_path.resolve() / "Flicker8k_Dataset" / "te.jpg"
    assert ds.images["val2014/coco.jpg"] == tmp_path.resolve() / "val2014" / "coco.jpg"
    assert ds.captions["tr.jpg"] == ["A cat .", "a pet"]  # tokens when raw is blank
    problem(ds, "dataset_flickr8k.json", "2 captions of 1 image not found", "lost.jpg")
    problem(ds, "dataset_flickr8k.json", "1 blank caption", "images[2].sentences[1]")
    problem(ds, "dataset_flickr8k.json", "1 image without a filename", "images[6]")
    assert len(ds.problems) == 3


def test_karpathy_json_path_as_root(tmp_path):
    ds = load_dataset(make_karpathy(tmp_path))
    assert ds.root == tmp_path.resolve() and len(ds) == 5


def test_karpathy_odd_entries(tmp_path):
    write_image(tmp_path / "images" / "a.jpg")  # lower-case images/ is searched too
    write_image(tmp_path / "sub" / "b.jpg")
    images = [
        {"filename": "a.jpg", "split": "holdout", "sentences": [sentence("A .")]},
        {"filename": "a.jpg", "split": "train", "sentences": [sentence("B .")]},
        {"filename": "sub/b.jpg", "split": ["train"], "sentences": "not a list"},
    ]
    (tmp_path / "dataset_x.json").write_text(json.dumps({"images": images}))
    ds = load_dataset(tmp_path)
    assert ds.captions == {"a.jpg": ["A ."]} and ds.splits == {s: [] for s in SPLITS}
    problem(ds, "2 images with an unknown split", "'holdout'")
    problem(ds, "1 image listed again", "a.jpg")
    problem(ds, "1 image without captions", "sub/b.jpg")
    assert len(ds.problems) == 3


def test_karpathy_bad_files_raise_dataset_error(tmp_path):
    (tmp_path / "dataset_a.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset_a.json: not valid JSON"):
        load_dataset(tmp_path)
    (tmp_path / "dataset_a.json").write_text('{"sentences": []}')
    with pytest.raises(DatasetError, match='no "images" list'):
        load_dataset(tmp_path)
    (tmp_path / "dataset_b.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match="several Karpathy files"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="no image has both a file and a caption"):
        load_dataset(tmp_path / "dataset_b.json")


# ----------------------------------------------------------------------------- detection and errors


def test_missing_root_and_unknown_layout(tmp_path):
    with pytest.raises(DatasetError, match="nowhere: no such file"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"Flickr8k.token.txt.*captions.txt.*dataset_\*.json"):
        load_dataset(tmp_path)
    with pytest.raises(ValueError, match="unknown layout"):
        load_dataset(tmp_path, layout="coco")


def test_forced_layout(tmp_path):
    make_flickr8k(tmp_path)
    make_karpathy(tmp_path)
    assert load_dataset(tmp_path).layout == "flickr8k"  # the most specific layout wins
    assert load_dataset(tmp_path, layout="karpathy").layout == "karpathy"
    with pytest.raises(DatasetError, match="not a Kaggle Flickr folder"):
        load_dataset(tmp_path, layout="kaggle")


def test_all_captions_missing_is_an_error_naming_the_reason(tmp_path):
    (tmp_path / "Images").mkdir()
    (tmp_path / "captions.txt").write_text("image,caption\nx.jpg,A dog .\n")
    with pytest.raises(DatasetError, match="no image has both a file and a caption.*not in Images"):
        load_dataset(tmp_path)


def test_loading_lists_the_image_folder_once_instead_of_a_stat_per_image(tmp_path, monkeypatch):
    # file creation on a busy disk is slow, so count file-system calls rather than time 8,000 images
    folder = tmp_path / "Flicker8k_Dataset"
    folder.mkdir()
    names = [f"{i:05d}_abc.jpg" for i in range(1000)]
    for name in names:  # the reader never opens images, so empty files will do
        (folder / name).touch()
    tokens = [f"{n}#{k}\tA thing {k} ." for n in names for k in range(5)]
    write_text(tmp_path / "Flickr8k_text" / "Flickr8k.token.txt", tokens)
    write_text(tmp_path / "Flickr8k_text" / "Flickr_8k.trainImages.txt", names)
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda *a, **k: stats.append(a[0]) or real_stat(*a, **k))
    start = time.perf_counter()
    ds = load_dataset(tmp_path)
    assert time.perf_counter() - start < 0.5
    assert len(ds) == len(ds.splits["train"]) == 1000 and not ds.problems
    assert len(stats) < 30, stats[:30]
