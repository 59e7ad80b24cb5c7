"""The Beam jobs on the DirectRunner, on generated photos and broken files, with the tiny model.

Each job runs in this process (and once on two worker processes): rows must equal those of
`captioner caption -o x.jsonl`, failures must land in their own output, reruns must not mix shards.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from captioner import beam
from captioner.cli import main


def _reason(path: Path) -> str:
    """What the photo loader says about `path`."""
    from captioner.images import ImageError, load_image

    with pytest.raises(ImageError) as e:
        load_image(path)
    return e.value.reason


def _rows(files) -> list[dict]:
    return sorted((json.loads(line) for f in files for line in Path(f).read_text().splitlines()),
                  key=lambda r: r["image"])


@pytest.fixture(scope="module")
def photos(shapes, tmp_path_factory) -> Path:
    """Six generated photos, one corrupt file, one empty file (and a folder the glob also matches)."""
    folder = tmp_path_factory.mktemp("photos")
    for image_id in sorted(shapes.images)[:6]:
        path = shapes.images[image_id]
        shutil.copy(path, folder / path.name)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 20)
    (folder / "empty.png").write_bytes(b"")
    (folder / "sub.jpg").mkdir()
    return folder


@pytest.fixture(scope="module")
def model(trained_run) -> str:
    return str(trained_run[0] / "model")


@pytest.fixture(scope="module")
def cli_rows(photos, model, tmp_path_factory) -> list[dict]:
    """What `captioner caption -o x.jsonl` writes for the same files."""
    out = tmp_path_factory.mktemp("cli") / "rows.jsonl"
    files = sorted(str(p) for p in photos.iterdir() if p.is_file())
    assert main(["caption", *files, "-o", str(out), "--model", model, "--top", "2"]) == 1  # two failed
    return _rows([out])


def _beam_caption(photos: Path, prefix: Path, model: str, *extra: str) -> int:
    return main(["beam", "caption", "--input", f"{photos}/*", "--output", str(prefix), "--model", model,
                 "--top", "2", *extra])


def test_rows_equal_the_cli_and_failures_have_their_own_output(photos, model, cli_rows, tmp_path, capsys):
    prefix = tmp_path / "out" / "run"
    assert _beam_caption(photos, prefix, model, "--runner", "DirectRunner", "--max-batch-size", "3") == 1
    captions = sorted(prefix.parent.glob("run-captions-*.jsonl"))
    failures = sorted(prefix.parent.glob("run-failures-*.jsonl"))
    assert captions and failures
    assert not list(prefix.parent.glob("run.staging-*")), "the staging folder must be gone"
    ok, failed = _rows(captions), _rows(failures)
    assert all(r["caption"] and r["error"] is None and len(r["beams"]) == 2 for r in ok)
    assert {r["image"]: r["error"] for r in failed} == {
        str(photos / name): _reason(photos / name) for name in ("corrupt.jpg", "empty.png")}
    assert _rows([*captions, *failures]) == cli_rows  # same content, the CLI's ordering aside
    assert "captioned 6 of 8 photos" in capsys.readouterr().err


def test_photos_from_other_stores_are_copied_and_give_the_same_rows(photos, model, cli_rows, tmp_path,
                                                                     monkeypatch):
    # Treat local paths as a remote store's: every photo goes through Beam's FileSystems.open.
    monkeypatch.setattr(beam, "_is_local", lambda path: False)
    prefix = tmp_path / "remote"
    assert _beam_caption(photos, prefix, model) == 1
    assert _rows(tmp_path.glob("remote-*.jsonl")) == cli_rows
    with beam.local_files([str(photos / "missing.jpg")], copy_all=True) as local:
        assert isinstance(local[0], Exception)  # a read error becomes that photo's failure


def test_rerun_refuses_existing_shards_and_overwrite_replaces_them_all(photos, model, tmp_path, capsys):
    prefix = tmp_path / "run"
    assert _beam_caption(photos, prefix, model, "--num-shards", "3") == 1
    assert len(list(tmp_path.glob("run-captions-*-of-00003.jsonl"))) == 3
    before = {p: p.read_bytes() for p in tmp_path.glob("run-*")}

    assert _beam_caption(photos, prefix, model) == 2
    err = capsys.readouterr().err
    assert "already has" in err and "add --overwrite" in err
    assert {p: p.read_bytes() for p in tmp_path.glob("run-*")} == before  # untouched

    assert _beam_caption(photos, prefix, model, "--num-shards", "1", "--overwrite") == 1
    captions = sorted(tmp_path.glob("run-captions-*.jsonl"))
    assert [p.name for p in captions] == ["run-captions-00000-of-00001.jsonl"]  # no old shard left
    assert len(_rows(captions)) == 6


def test_a_failed_job_leaves_the_old_output_whole(tmp_path):
    old = tmp_path / "run-captions-00000-of-00001.jsonl"
    old.write_text('{"image": "a.jpg"}\n')
    with pytest.raises(ValueError, match="already has 1 output file"):
        beam.StagedOutput(str(tmp_path / "run"), ("captions",))
    staged = beam.StagedOutput(str(tmp_path / "run"), ("captions",), overwrite=True)
    Path(staged.staging).mkdir()
    Path(staged.path("captions-00000-of-00002.jsonl")).write_text("half a job\n")
    staged.abandon()  # what caption_job does when the pipeline raises
    assert [p.name for p in tmp_path.iterdir()] == [old.name] and old.read_text() == '{"image": "a.jpg"}\n'


def test_no_matching_files_is_a_one_line_error(model, tmp_path, capsys):
    assert main(["beam", "caption", "--input", f"{tmp_path}/*.jpg", "--output", str(tmp_path / "o"),
                 "--model", model]) == 2
    assert capsys.readouterr().err.strip() == f"captioner: error: --input: no files match {tmp_path}/*.jpg"


def test_two_worker_processes(photos, model, cli_rows, tmp_path):
    prefix = tmp_path / "mp"
    assert _beam_caption(photos, prefix, model, "--direct_num_workers", "2",
                         "--direct_running_mode", "multi_processing") == 1
    assert _rows(tmp_path.glob("mp-*.jsonl")) == cli_rows


# ---------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_shapes(shapes_root, tmp_path_factory) -> Path:
    """The shapes dataset with one dev photo corrupted."""
    from captioner.data import load_dataset

    root = tmp_path_factory.mktemp("broken") / "shapes"
    shutil.copytree(shapes_root, root)
    dataset = load_dataset(root)
    dataset.images[dataset.splits["dev"][0]].write_bytes(b"not a photo")
    return root


def test_features_are_sharded_streamed_and_fill_the_cache(broken_shapes, tiny_encoder, tmp_path):
    from captioner.data import load_dataset
    from captioner.feature_shards import feature_dataset, read_manifest
    from captioner.features import FeatureCache, content_key, extract_features

    prefix = tmp_path / "feat" / "dev"
    assert main(["beam", "extract-features", "--data", str(broken_shapes), "--split", "dev", "--encoder", "tiny",
                 "--output", str(prefix), "--num-shards", "2"]) == 1  # one photo failed
    dataset = load_dataset(broken_shapes)
    dev = dataset.splits["dev"]
    manifest = read_manifest(str(prefix))
    assert manifest["encoder"] == tiny_encoder.describe() and manifest["count"] == len(dev) - 1
    assert len(manifest["shards"]) == 2 and all((prefix.parent / s).is_file() for s in manifest["shards"])
    failed = _rows(prefix.parent.glob("dev-failures-*.jsonl"))
    assert [(r["id"], r["error"]) for r in failed] == [(dev[0], _reason(dataset.images[dev[0]]))]

    # Streamed through tf.data, equal to the features the in-process extractor computes.
    ds = feature_dataset(str(prefix), tiny_encoder.describe())
    got = {i.decode(): (k.decode(), f) for i, k, f in ds.as_numpy_iterator()}
    assert sorted(got) == dev[1:]
    expected, _ = extract_features([dataset.images[i] for i in dev[1:]], tiny_encoder, progress=False)
    for image_id, vector in zip(dev[1:], expected):
        assert got[image_id][0] == content_key(dataset.images[image_id])
        np.testing.assert_allclose(got[image_id][1], vector, rtol=1e-5, atol=1e-6)

    # import-features puts them where `captioner train` looks: nothing is left to encode.
    cache_dir = tmp_path / "cache"
    assert main(["import-features", str(prefix), "--cache-dir", str(cache_dir)]) == 0
    cache = FeatureCache(tiny_encoder.describe(), cache_dir)
    for image_id in dev[1:]:
        np.testing.assert_allclose(cache.get(content_key(dataset.images[image_id])), got[image_id][1])


def test_features_of_another_encoder_are_refused(tmp_path):
    from captioner.feature_shards import ShardError, feature_dataset

    prefix = tmp_path / "f"
    (tmp_path / "f-manifest.json").write_text(json.dumps(
        {"format": "captioner-features", "version": 1, "count": 0, "shards": [],
         "encoder": {"name": "tiny", "weights_id": "x", "image_size": 32, "feature_dim": 8}}))
    with pytest.raises(ShardError, match="f-manifest.json: features of encoder tiny"):
        feature_dataset(str(prefix), {"name": "tiny", "weights_id": "y", "image_size": 32, "feature_dim": 8})
