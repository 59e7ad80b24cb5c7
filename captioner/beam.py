"""Apache Beam pipelines: caption photos, and extract training features, on any Beam runner.

Both jobs have one shape: match files -> spread them over workers -> `RunInference` with a
captioner `ModelHandler` (the model is loaded once per worker process and shared by its
threads; Beam's `BatchElements` makes the batches) -> sharded files.

Outputs are never mixed: the job writes into a fresh staging folder beside `PREFIX`, and only
when it has succeeded are the shards moved to `PREFIX-<kind>-SSSSS-of-NNNNN.<ext>`. Existing
shards of `PREFIX` are refused unless `overwrite`, and then removed only after the new job has
succeeded, so a failed rerun leaves the old output whole and a finished one leaves no old shard.

Needs the `beam` extra: `pip install "captioner[beam]"`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

try:
    # Beam's GCP module logs a warning about optional clients on import; it is not ours to show.
    _root = logging.getLogger()
    _level, _root.level = _root.level, logging.ERROR
    try:
        import apache_beam as beam
        from apache_beam.io import fileio
        from apache_beam.io.filesystems import FileSystems
        from apache_beam.ml.inference.base import ModelHandler, RunInference
        from apache_beam.options.pipeline_options import PipelineOptions
    finally:
        _root.level = _level
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(f"captioner's Beam pipelines need Apache Beam: pip install \"captioner[beam]\" ({e})") from e

from captioner.decoding import DecodeOptions
from captioner.output import OutputError, display_name, row

FAILURES = "failures"


# ---------------------------------------------------------------------------
# Outputs: staged, then moved into place
# ---------------------------------------------------------------------------


class StagedOutput:
    """Shards written under `PREFIX.staging-<id>/` and moved to `PREFIX-<name>` on `commit`."""

    def __init__(self, prefix: str, kinds: Sequence[str], overwrite: bool = False):
        self.prefix, self.kinds = prefix, tuple(kinds)
        self.staging = f"{prefix}.staging-{uuid.uuid4().hex[:12]}"
        existing = self.existing()
        if existing and not overwrite:
            raise OutputError(f"{existing[0]}: --output {prefix} already has {len(existing)} output file(s); "
                              "add --overwrite to replace them or choose another prefix")

    def existing(self) -> list[str]:
        """The files a finished run of this prefix would have written."""
        patterns = [f"{self.prefix}-{kind}-*" for kind in self.kinds] + [f"{self.prefix}-manifest.json"]
        return sorted(m.path for result in FileSystems.match(patterns) for m in result.metadata_list)

    def path(self, name: str) -> str:
        """Where the job writes `name` (a WriteToText prefix or a file)."""
        return FileSystems.join(self.staging, name)

    def commit(self) -> list[str]:
        """Move the staged files into place (old shards of the prefix go first); their final paths."""
        staged = sorted(m.path for m in FileSystems.match([FileSystems.join(self.staging, "*")])[0].metadata_list)
        old = self.existing()
        if old:
            FileSystems.delete(old)
        final = [f"{self.prefix}-{FileSystems.split(p)[1]}" for p in staged]
        if staged:
            FileSystems.rename(staged, final)
        self.abandon()
        return final

    def abandon(self) -> None:
        """Remove the staging folder (after a failed job, or once committed)."""
        if FileSystems.exists(self.staging):
            FileSystems.delete([self.staging])


# ---------------------------------------------------------------------------
# Reading photos through Beam's file systems
# ---------------------------------------------------------------------------


def _is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) in (None, "file")


@contextlib.contextmanager
def local_files(paths: Sequence[str], copy_all: bool = False) -> Iterator[list[str | Exception]]:
    """A local file per path: local paths as they are (so the loader's checks and messages are
    the CLI's own), other stores' objects copied into a temporary folder for the batch, with their
    suffix. A copy that fails is given as the exception instead of a path."""
    folder = None
    out: list[str | Exception] = []
    try:
        for i, path in enumerate(paths):
            if _is_local(path) and not copy_all:
                out.append(path)
                continue
            folder = folder or tempfile.mkdtemp(prefix="captioner-beam-")
            local = os.path.join(folder, f"{i}{os.path.splitext(path)[1][:16]}")
            try:
                with FileSystems.open(path) as src, open(local, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                out.append(local)
            except Exception as e:  # noqa: BLE001 - any store's read error becomes that photo's failure
                out.append(e)
        yield out
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def _unreadable(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"cannot be read ({text[:300]})"


class _MatchedPhotos(beam.PTransform):
    """The paths matching `pattern` (any Beam file system), spread over the workers."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = pattern

    def expand(self, root):
        return (root
                | "Match" >> fileio.MatchFiles(self.pattern)
                | "Path" >> beam.Map(lambda m: m.path)
                # Glob patterns match folders on local disks; the CLI skips them inside folders too.
                | "NotFolders" >> beam.Filter(lambda p: not (_is_local(p) and os.path.isdir(p)))
                # Without this the runner fuses matching with inference into one worker.
                | "Spread" >> beam.Reshuffle())


# ---------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------


class CaptionerModelHandler(ModelHandler[str, Any, Any]):
    """RunInference handler: photo paths (any Beam file system) in, `CaptionResult`s out.

    `load_model` builds a `Captioner` once per worker process (Beam shares it among the process's
    threads); `run_inference` calls `Captioner.caption` on the batch, exactly as the CLI does, so
    an unreadable photo is a result with its reason, never an exception.
    """

    def __init__(self, model: str | None = None, encoder_weights: str = "default",
                 options: Callable[[DecodeOptions], DecodeOptions] | None = None, batch_size: int = 32,
                 max_batch_size: int = 64, share_across_processes: bool = False):
        super().__init__()
        self.model, self.encoder_weights = model, encoder_weights
        self.options = options  # the model's defaults -> the options to decode with
        self.batch_size, self.max_batch_size = batch_size, max_batch_size
        self.share_across_processes = share_across_processes

    def load_model(self):
        from captioner.captioner import Captioner

        return Captioner.load(self.model, self.encoder_weights)

    def run_inference(self, batch: Sequence[str], model, inference_args: dict | None = None) -> Iterable:
        from captioner.captioner import CaptionResult

        options = self.options(model.options) if self.options else model.options
        with local_files(batch) as local:
            readable = [p for p in local if isinstance(p, str)]
            results = iter(model.caption(readable, options, batch_size=self.batch_size) if readable else [])
            out = []
            for name, path in zip(batch, local):
                if isinstance(path, str):
                    out.append(replace(next(results), source=name))
                else:
                    out.append(CaptionResult(name, error=_unreadable(path)))
        return out

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        # BatchElements would start at one photo and grow; every decoding step has a fixed cost,
        # so small batches halve the throughput (measured, docs/scale.md). A bundle's last
        # batch may still be smaller.
        return {"min_batch_size": min(self.batch_size, self.max_batch_size), "max_batch_size": self.max_batch_size}

    def share_model_across_processes(self) -> bool:
        return self.share_across_processes

    def get_metrics_namespace(self) -> str:
        return "captioner"


class _SplitFailures(beam.DoFn):
    """JSON rows as `captioner caption -o x.jsonl` writes them; failed photos to `failures`."""

    def __init__(self, top: int):
        super().__init__()
        self.top = top

    def process(self, result):
        line = json.dumps(row(result, self.top), ensure_ascii=False)
        yield line if result.ok else beam.pvalue.TaggedOutput(FAILURES, line)


@dataclass
class JobReport:
    files: list[str]
    counts: dict[str, int]


def caption_job(pattern: str, prefix: str, handler: CaptionerModelHandler, top: int = 1,
                pipeline_args: Sequence[str] = (), overwrite: bool = False, num_shards: int = 0) -> JobReport:
    """Caption every photo matching `pattern`: rows to `PREFIX-captions-*.jsonl`, unreadable photos
    (with the reason) to `PREFIX-failures-*.jsonl`; runs on the runner `pipeline_args` name."""
    if not any(r.metadata_list for r in FileSystems.match([pattern])):
        raise OutputError(f"--input: no files match {pattern}")
    output = StagedOutput(prefix, ("captions", FAILURES), overwrite)
    try:
        with beam.Pipeline(options=PipelineOptions(list(pipeline_args))) as p:
            results = (p | "Photos" >> _MatchedPhotos(pattern) | "Caption" >> RunInference(handler)
                       | "Rows" >> beam.ParDo(_SplitFailures(top)).with_outputs(FAILURES, main="captions"))
            for kind in ("captions", FAILURES):
                _ = results[kind] | f"Write {kind}" >> beam.io.WriteToText(
                    output.path(kind), file_name_suffix=".jsonl", shard_name_template="-SSSSS-of-NNNNN",
                    num_shards=num_shards if kind == "captions" else 0)
    except BaseException:
        output.abandon()
        raise
    files = output.commit()
    return JobReport(files, _count_lines(files))


def _count_lines(files: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in files:
        kind = FAILURES if f"-{FAILURES}-" in FileSystems.split(path)[1] else "captions"
        with FileSystems.open(path) as f:
            counts[kind] = counts.get(kind, 0) + sum(1 for _ in f)
    return counts


# ---------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------


class EncoderModelHandler(ModelHandler[tuple, tuple, Any]):
    """RunInference handler: (image id, path) in; ("ok", id, content key, feature) or
    ("failed", id, path, reason) out. One encoder per worker process, batched forward passes."""

    def __init__(self, encoder: str, weights: str = "default", batch_size: int = 32, max_batch_size: int = 64):
        super().__init__()
        self.encoder, self.weights = encoder, weights
        self.batch_size, self.max_batch_size = batch_size, max_batch_size

    def load_model(self):
        from captioner.encoder import ImageEncoder

        return ImageEncoder(self.encoder, self.weights)

    def run_inference(self, batch: Sequence[tuple], model, inference_args: dict | None = None) -> Iterable:
        from captioner.features import content_key, iter_features

        out: list[tuple] = []
        with local_files([path for _, path in batch]) as local:
            readable = [i for i, p in enumerate(local) if isinstance(p, str)]
            for i, p in enumerate(local):
                if not isinstance(p, str):
                    out.append(("failed", batch[i][0], batch[i][1], _unreadable(p)))
            sources = [local[i] for i in readable]
            for chunk in iter_features(sources, model, None, self.batch_size):
                for j, vector in zip(chunk.indices, chunk.features):
                    image_id = batch[readable[j]][0]
                    out.append(("ok", image_id, content_key(sources[j]), vector))
                for j, error in chunk.errors:
                    image_id, path = batch[readable[j]]
                    out.append(("failed", image_id, path, error.reason))
        return out

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return {"min_batch_size": min(self.batch_size, self.max_batch_size), "max_batch_size": self.max_batch_size}

    def get_metrics_namespace(self) -> str:
        return "captioner"


class _Records(beam.DoFn):
    def process(self, item):
        from captioner.feature_shards import encode_record

        if item[0] == "ok":
            _, image_id, key, vector = item
            yield encode_record(image_id, key, vector)
        else:
            _, image_id, path, reason = item
            yield beam.pvalue.TaggedOutput(FAILURES, json.dumps(
                {"image": display_name(path), "id": image_id, "error": reason}, ensure_ascii=False))


def features_job(photos: Mapping[str, str], prefix: str, encoder_identity: dict, handler: EncoderModelHandler,
                 about: dict | None = None, pipeline_args: Sequence[str] = (), overwrite: bool = False,
                 num_shards: int = 0) -> JobReport:
    """Encode `photos` (image id -> path on any Beam file system) into TFRecord shards
    `PREFIX-features-*.tfrecord` + `PREFIX-manifest.json`; failures to `PREFIX-failures-*.jsonl`."""
    from captioner.feature_shards import FORMAT, VERSION

    output = StagedOutput(prefix, ("features", FAILURES), overwrite)
    try:
        with beam.Pipeline(options=PipelineOptions(list(pipeline_args))) as p:
            results = (p | "Photos" >> beam.Create(sorted(photos.items()))
                       | "Spread" >> beam.Reshuffle()
                       | "Encode" >> RunInference(handler)
                       | "Records" >> beam.ParDo(_Records()).with_outputs(FAILURES, main="features"))
            _ = results["features"] | "Write features" >> beam.io.WriteToTFRecord(
                output.path("features"), file_name_suffix=".tfrecord", shard_name_template="-SSSSS-of-NNNNN",
                num_shards=num_shards)
            _ = results[FAILURES] | "Write failures" >> beam.io.WriteToText(
                output.path(FAILURES), file_name_suffix=".jsonl", shard_name_template="-SSSSS-of-NNNNN")
            _ = (results["features"] | "Count" >> beam.combiners.Count.Globally()
                 | "Write count" >> beam.io.WriteToText(output.path("count"), shard_name_template=""))
        with FileSystems.open(output.path("count")) as f:
            count = int(f.read().decode().strip() or 0)
        FileSystems.delete([output.path("count")])
        shards = sorted(FileSystems.split(m.path)[1]
                        for m in FileSystems.match([output.path("features-*")])[0].metadata_list)
        folder_name = FileSystems.split(prefix)[1]
        manifest = {"format": FORMAT, "version": VERSION, "encoder": encoder_identity, "count": count,
                    "shards": [f"{folder_name}-{name}" for name in shards], **(about or {})}
        with FileSystems.create(output.path("manifest.json")) as f:
            f.write(json.dumps(manifest, indent=2).encode())
    except BaseException:
        output.abandon()
        raise
    files = output.commit()
    failures = _count_lines([f for f in files if f"-{FAILURES}-" in f])
    return JobReport(files, {"features": count, FAILURES: failures.get(FAILURES, 0)})
