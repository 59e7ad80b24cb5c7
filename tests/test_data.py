"""Dataset readers on tiny hand-made copies of each layout, edge cases included."""
from __future__ import annotations

import csv
import gzip
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

import captioner
from captioner.data import (
    SOURCE_HASH,
    SOURCE_KARPATHY,
    SOURCE_SHIPPED,
    SOURCE_SPLIT_FILES,
    SPLITS,
    CaptionDataset,
    DatasetError,
    load_dataset,
)

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
    assert ds.split_source == f"{SOURCE_SPLIT_FILES} (train, dev)"


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
    assert ds.split_source == SOURCE_HASH and "not comparable" in ds.split_source
    assert ds.describe()["name"] == "small"  # not Flickr8k: named after its folder
    bigger = load_dataset(make_kaggle(tmp_path / "big", names + [f"new{i}.jpg" for i in range(50)]))
    for split in SPLITS:
        assert [i for i in bigger.splits[split] if not i.startswith("new")] == ds.splits[split]


def test_kaggle_uses_flickr_split_files_when_present(tmp_path):
    root = make_kaggle(tmp_path, ["x.jpg", "y.jpg", "z.jpg"])
    write_text(root / "Flickr_8k.trainImages.txt", ["x.jpg", "y.jpg"])
    write_text(root / "Flickr_8k.testImages.txt", ["z.jpg"])
    ds = load_dataset(root)
    assert ds.splits == {"train": ["x.jpg", "y.jpg"], "dev": [], "test": ["z.jpg"]}
    assert ds.split_source == f"{SOURCE_SPLIT_FILES} (train, test)"


def official_lists() -> dict[str, list[str]]:
    """The Flickr8k split lists shipped with the package, read the way a user could read them."""
    asset = Path(captioner.__file__).parent / "assets" / "splits" / "flickr8k.json.gz"
    return json.loads(gzip.decompress(asset.read_bytes()))


def flickr8k_names(n_train: int = 19) -> tuple[list[str], dict[str, list[str]]]:
    """Some official Flickr8k names (train, then one dev, one test) and the splits they belong to."""
    lists = official_lists()
    expected = {"train": lists["train"][:n_train], "dev": lists["dev"][:1], "test": lists["test"][:1]}
    return [name for split in SPLITS for name in expected[split]], expected


def test_shipped_flickr8k_lists_are_the_official_split():
    lists = official_lists()
    sizes = {split: len(names) for split, names in lists.items()}
    assert sizes == {"train": 6000, "dev": 1000, "test": 1000}
    assert all(names == sorted(set(names)) for names in lists.values())  # sorted, no repeats
    train, dev, test = (set(lists[s]) for s in SPLITS)
    assert not (train & dev or train & test or dev & test)
    assert "1000268201_693b08cb0e.jpg" in train and "3385593926_d3e9c21170.jpg" in test


def test_kaggle_with_flickr8k_names_uses_the_official_split(tmp_path, caplog):
    # the Kaggle re-pack has 91 photos in no official split: they stay in no split
    names, expected = flickr8k_names()
    extra = "9999999999_0123456789.jpg"
    with caplog.at_level(logging.INFO, logger="captioner.data"):
        ds = load_dataset(make_kaggle(tmp_path / "flickr8k-kaggle", names + [extra]))
    assert ds.splits == expected and extra in ds.images
    assert ds.split_source == SOURCE_SHIPPED
    assert ds.describe()["name"] == "flickr8k"
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 1 and "kaggle layout" in info[0] and SOURCE_SHIPPED in info[0]


def test_kaggle_with_a_few_flickr8k_names_keeps_the_hash_split(tmp_path):
    names, _ = flickr8k_names(n_train=3)
    ds = load_dataset(make_kaggle(tmp_path, names + [f"other{i}.jpg" for i in range(5)]))
    assert ds.split_source == SOURCE_HASH
    assert sorted(sum(ds.splits.values(), [])) == sorted(ds.images)


def test_flickr8k_folder_without_split_files_uses_the_official_split(tmp_path):
    names, expected = flickr8k_names()
    for name in names:
        write_image(tmp_path / "Flicker8k_Dataset" / name)
    write_text(tmp_path / "Flickr8k_text" / "Flickr8k.token.txt", [f"{n}#0\tA photo ." for n in names])
    ds = load_dataset(tmp_path)
    assert ds.splits == expected and ds.split_source == SOURCE_SHIPPED


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
    line = problem(ds, "dataset_flickr8k.json", "2 captions of 1 image not found", "lost.jpg")
    assert f"searched {tmp_path.resolve()}/ and its Images/, images/, Flicker8k_Dataset/" in line
    assert "flickr30k_images/flickr30k_images/" in line and "<filepath>/" in line and "images=" in line
    assert ds.split_source == SOURCE_KARPATHY
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
    # sub/b.jpg has an unknown split too, but it is skipped (no captions) and reported for that alone
    problem(ds, "1 image with an unknown split", "'holdout'")
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


def test_several_layouts_need_a_forced_layout(tmp_path, caplog):
    make_flickr8k(tmp_path)
    make_karpathy(tmp_path)
    with pytest.raises(DatasetError) as error:
        load_dataset(tmp_path)
    message = str(error.value)
    assert "\n" not in message and "several dataset layouts" in message
    assert "flickr8k (Flicker8k_Dataset/ + Flickr8k_text/Flickr8k.token.txt)" in message
    assert "karpathy (dataset_flickr8k.json)" in message
    assert "pass layout='flickr8k' or layout='karpathy'" in message and "--layout" in message
    with caplog.at_level(logging.INFO, logger="captioner.data"):
        assert load_dataset(tmp_path, layout="karpathy").layout == "karpathy"
    assert "read as karpathy layout" in caplog.records[-1].getMessage()
    assert load_dataset(tmp_path, "flickr8k").layout == "flickr8k"
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


# ----------------------------------------------------------------------------- photo folders (images=)


def karpathy_json(path: Path, entries: list[dict], dataset: str | None = None) -> Path:
    data = {"images": entries, **({"dataset": dataset} if dataset else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "photo_dir", ["flickr30k-images", "flickr30k_images", "flickr30k_images/flickr30k_images"]
)
def test_karpathy_finds_flickr30k_photo_folders(tmp_path, photo_dir):
    write_image(tmp_path / photo_dir / "1000092795.jpg")
    entries = [{"filename": "1000092795.jpg", "split": "train", "sentences": [sentence("Two men .")]}]
    karpathy_json(tmp_path / "dataset_flickr30k.json", entries, dataset="flickr30k")
    ds = load_dataset(tmp_path)
    assert ds.images["1000092795.jpg"] == tmp_path.resolve() / photo_dir / "1000092795.jpg"
    assert ds.describe()["name"] == "flickr30k"


def test_images_points_karpathy_entries_at_another_photo_folder(tmp_path):
    # COCO: the JSON is downloaded on its own, the photos live in train2014/ and val2014/ elsewhere
    write_image(tmp_path / "coco" / "val2014" / "COCO_val2014_000000391895.jpg")
    write_image(tmp_path / "coco" / "train2014" / "COCO_train2014_000000057870.jpg")
    write_image(tmp_path / "coco" / "plain.jpg")
    entries = [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "val",
         "sentences": [sentence("A man rides .")]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000057870.jpg", "split": "restval",
         "sentences": [sentence("A table .")]},
        {"filename": "plain.jpg", "split": "test", "sentences": [sentence("A plain photo .")]},
    ]
    json_path = karpathy_json(tmp_path / "karpathy" / "dataset_coco.json", entries, dataset="coco")
    with pytest.raises(DatasetError, match=rf"not found \(searched {tmp_path.resolve()}/karpathy/"):
        load_dataset(json_path)  # beside the JSON there are no photos: say where we looked
    ds = load_dataset(json_path, images=tmp_path / "coco")
    assert ds.splits == {
        "train": ["train2014/COCO_train2014_000000057870.jpg"],
        "dev": ["val2014/COCO_val2014_000000391895.jpg"],
        "test": ["plain.jpg"],
    }
    assert ds.images["plain.jpg"] == tmp_path.resolve() / "coco" / "plain.jpg"
    assert ds.root == tmp_path.resolve() / "karpathy" and ds.describe()["name"] == "coco"
    with pytest.raises(DatasetError, match="no such folder"):
        load_dataset(json_path, images=tmp_path / "nowhere")


def test_images_missing_under_the_given_folder_name_it(tmp_path):
    (tmp_path / "photos").mkdir()
    entries = [{"filepath": "val2014", "filename": "x.jpg", "split": "val", "sentences": [sentence("A .")]}]
    karpathy_json(tmp_path / "dataset_coco.json", entries)
    with pytest.raises(DatasetError, match=rf"searched {tmp_path.resolve()}/photos/<filepath>/"):
        load_dataset(tmp_path, images=tmp_path / "photos")


def test_images_for_the_kaggle_and_flickr8k_layouts(tmp_path):
    make_kaggle(tmp_path / "elsewhere", ["x.jpg", "y.jpg"])
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere" / "captions.txt").rename(tmp_path / "data" / "captions.txt")
    ds = load_dataset(tmp_path / "data", images=tmp_path / "elsewhere")
    assert ds.layout == "kaggle" and sorted(ds.images) == ["x.jpg", "y.jpg"]
    assert ds.images["x.jpg"] == tmp_path.resolve() / "elsewhere" / "Images" / "x.jpg"


# ----------------------------------------------------------------------------- Karpathy without splits


def test_karpathy_without_split_field_uses_the_official_flickr8k_split(tmp_path):
    names, expected = flickr8k_names()
    for name in names:
        write_image(tmp_path / "Flicker8k_Dataset" / name)
    entries = [{"filename": n, "sentences": [sentence("A photo .")]} for n in names]
    entries.append({"filename": "lost.jpg", "sentences": [sentence("Gone .")]})  # no file: skipped
    karpathy_json(tmp_path / "dataset_flickr8k.json", entries)
    ds = load_dataset(tmp_path)
    assert ds.splits == expected
    assert ds.split_source == f"{SOURCE_SHIPPED}; the JSON has no 'split' field"
    problem(ds, "1 caption of 1 image not found", "lost.jpg")
    assert len(ds.problems) == 1  # no "unknown split" line, and no count of skipped entries in it


def test_karpathy_without_split_field_falls_back_to_the_hash(tmp_path):
    names = [f"{i:04d}.jpg" for i in range(60)]
    for name in names:
        write_image(tmp_path / "images" / name)
    entries = [{"filename": n, "sentences": [sentence("A photo .")]} for n in names]
    entries[0]["split"] = "test"  # one entry has a split: kept, and the source says both
    karpathy_json(tmp_path / "dataset_x.json", entries)
    ds = load_dataset(tmp_path)
    assert sorted(sum(ds.splits.values(), [])) == names and ds.splits["train"]  # trainable
    assert "0000.jpg" in ds.splits["test"]
    assert ds.split_source == f"{SOURCE_KARPATHY}; 59 images without one: {SOURCE_HASH}"
    assert not ds.problems


# ----------------------------------------------------------------------------- describe


def test_describe_names_the_data_without_a_machine_path(tmp_path):
    make_karpathy(tmp_path)
    description = load_dataset(tmp_path).describe()
    assert description == {
        "name": "flickr8k",  # the JSON's "dataset" field
        "layout": "karpathy",
        "split_source": SOURCE_KARPATHY,
        "images": {"train": 2, "dev": 2, "test": 1, "unsplit": 0},
    }
    assert str(tmp_path) not in json.dumps(description)
    flickr = load_dataset(make_flickr8k(tmp_path / "f8k")).describe()
    assert flickr["name"] == "flickr8k"
    assert flickr["images"] == {"train": 2, "dev": 1, "test": 0, "unsplit": 1}
    assert load_dataset(tmp_path / "f8k").subset("train").describe()["images"]["train"] == 2
