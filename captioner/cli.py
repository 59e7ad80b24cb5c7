"""The `captioner` command: caption photos, extract features, train and evaluate.

Thin by design: every command parses options and calls the package's public API. Options
that need no model are checked before TensorFlow is imported, so a mistake costs no wait.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from captioner import paths
from captioner.bundle import MAX_MEMBERS
from captioner.captioner import RUNTIMES  # imports no TensorFlow: the runtimes load theirs when chosen
from captioner.decoding import METHODS, DecodeOptions, OptionError
from captioner.familiarity import UNFAMILIAR


# DecodeOptions field -> the flag that sets it, for messages that name what the user typed.
DECODE_FLAGS = {"method": "--method", "beam_size": "--beam-size", "max_len": "--max-len",
                "length_penalty": "--length-penalty", "temperature": "--temperature", "seed": "--seed",
                "num_results": "--top"}
_DEFAULTS = DecodeOptions()


class UsageError(ValueError):
    """A bad combination of options, found before any work starts."""


class _BeamParser(argparse.ArgumentParser):
    """A `captioner beam` job's parser: options it does not know are Beam pipeline options, kept
    in `pipeline_args` for Beam to parse, instead of errors."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)  # --temp_location is Beam's, not an abbreviation

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.pipeline_args = [*getattr(namespace, "pipeline_args", []), *extras]
        return namespace, []


def _decoding_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding (defaults: the model's own)")
    g.add_argument("--method", choices=METHODS, help=f"decoding method (usually {_DEFAULTS.method})")
    g.add_argument("--beam-size", type=int, metavar="K", help=f"beam width (usually {_DEFAULTS.beam_size})")
    g.add_argument("--max-len", type=int, metavar="N", help=f"longest caption in words (usually {_DEFAULTS.max_len})")
    g.add_argument("--length-penalty", type=float, metavar="A",
                   help="rank beams by log-prob / tokens**A (0 = plain log-prob; "
                   f"usually {_DEFAULTS.length_penalty})")
    g.add_argument("--temperature", type=float, metavar="T",
                   help=f"sampling temperature, with --method sample (usually {_DEFAULTS.temperature})")
    g.add_argument("--seed", type=int, help="random seed for sampling")


def _model_option(p: argparse.ArgumentParser, runtime: bool = True) -> None:
    p.add_argument("--model", metavar="MODEL", help="model bundle folder, or the name of a shipped one "
                   f"({', '.join(paths.shipped_models())}); default: $CAPTIONER_MODEL, else the shipped model")
    p.add_argument("--encoder-weights", default="default", metavar="W",
                   help="encoder weights: 'default' (offline file), 'imagenet' (Keras download) or a .weights.h5 path")
    if runtime:
        p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                       help="'litert': the bundle's .tflite files, no TensorFlow (fast start; its int8 encoder when "
                       "it has one); 'litert-float': the same with the float encoder (TensorFlow's captions); "
                       "'tf': TensorFlow; 'auto' (default): litert when the bundle has its files")


def _data_options(p: argparse.ArgumentParser) -> None:
    from captioner.data import LAYOUTS

    p.add_argument("--data", metavar="DIR", help="dataset folder (Flickr8k, Kaggle or Karpathy layout; "
                   "default: $CAPTIONER_DATA or data/flickr8k)")
    p.add_argument("--layout", choices=("auto", *LAYOUTS), default="auto",
                   help="which layout to read when the folder holds several (default: the one found)")
    p.add_argument("--images", metavar="DIR", help="the photos' folder, when not beside the captions "
                   "(e.g. COCO's, holding train2014/ and val2014/)")


def _encoder_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", metavar="NAME",
                   help="image encoder (default: efficientnet-lite0; see `captioner encoders`)")
    p.add_argument("--encoder-weights", default="default", metavar="W",
                   help="'default' (offline file), 'imagenet' (Keras download), 'none' (random) or a .weights.h5 path")
    p.add_argument("--cache-dir", metavar="DIR", help="feature cache (default: $CAPTIONER_HOME/features)")


def _train_options(p: argparse.ArgumentParser) -> None:
    """A flag for every `TrainConfig` field, with its help; unset flags keep the preset's value."""
    from captioner.train_config import PRESETS, TrainConfig

    p.add_argument("--preset", choices=list(PRESETS),
                   help="'default' (the first, cross-entropy stage of the shipped Flickr8k model; the default), 'attend' (Show, Attend and Tell on "
                   "Flickr8k), 'tiny' (quick demo) or 'scst' (self-critical fine-tuning; the default with --scst)")
    g = p.add_argument_group("training settings (default: from the preset)")
    for f in dataclasses.fields(TrainConfig):
        kind = str if f.type == "str" else int if f.type == "int" else float
        g.add_argument(f"--{f.name.replace('_', '-')}", type=kind, choices=f.metadata["choices"],
                       metavar=None if f.metadata["choices"] else f.name.split("_")[-1].upper(),
                       help=f"{f.metadata['help']} (default {f.default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description="Describe photos in English sentences "
                                     "(Show and Tell: a CNN feature initialises an LSTM decoder).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("caption", help="caption photos and folders of photos",
                       description="Caption photos. Rows are written as they are done; an unreadable file is "
                       "reported and skipped; the exit code is 1 if any photo failed. The first photo takes a "
                       "few seconds (TensorFlow starts and builds the networks); then tens of photos a second.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="photo files and/or folders")
    p.add_argument("-r", "--recursive", action="store_true", help="also look in sub-folders")
    p.add_argument("-o", "--output", metavar="FILE", help="write rows to FILE (.csv or .jsonl) instead of stdout")
    p.add_argument("--resume", action="store_true",
                   help="continue --output after an interruption: keep captioned photos, retry failed ones")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--top", type=int, default=1, metavar="N",
                   help="also give the N best beams, ranked by score (beam search only)")
    p.add_argument("--batch-size", type=int, default=32, help="photos encoded at once (default 32)")
    p.add_argument("--save-attention", metavar="DIR",
                   help="attention models: also write a PNG per photo into DIR, where the model looked for "
                   "each word (one heatmap per word, the word under it)")
    _model_option(p)
    _decoding_options(p)

    p = sub.add_parser("extract-features", help="encode a dataset's photos into the feature cache",
                       description="Encode every photo of a dataset once; later training and evaluation "
                       "runs read the cached features.")
    _data_options(p)
    p.add_argument("--split", choices=("train", "dev", "test", "all"), default="all")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grid", action="store_true", help="cache the spatial maps that show-attend-tell "
                   "reads (float16, ~125 KB a photo for efficientnet-lite0) instead of pooled vectors")
    _encoder_options(p)

    p = sub.add_parser("train", help="train a model bundle on a dataset",
                       description="Train the decoder on the train split with teacher forcing; pick the best "
                       "epoch on dev BLEU-4 (--monitor; CIDEr-D with --scst). Rerun the same command to resume an "
                       "interrupted run.")
    _data_options(p)
    p.add_argument("--output", required=True, metavar="DIR", help="run folder: the bundle goes to DIR/model")
    p.add_argument("--scst", action="store_true",
                   help="self-critical training: fine-tune a trained model (--init) on dev-selected CIDEr-D rewards")
    p.add_argument("--init", metavar="MODEL", help="with --scst: the bundle to fine-tune (default: the default model)")
    p.add_argument("--distribute", choices=("none", "mirrored"), default="none",
                   help="'mirrored': split each batch over every GPU of this machine (tf.distribute); "
                   "default: one device (a GPU if there is one)")
    p.add_argument("--train-features", metavar="PREFIX",
                   help="stream the train split's features from the shards of `captioner beam extract-features "
                   "--output PREFIX` (never all in memory) instead of the feature cache; the encoder defaults to "
                   "theirs")
    p.add_argument("--dev-features", metavar="PREFIX",
                   help="with --train-features: read the dev split's features from these shards (may be the same "
                   "PREFIX) instead of the feature cache")
    _train_options(p)
    _encoder_options(p)

    p = sub.add_parser("evaluate", help="score a model on a dataset split (BLEU-1..4, CIDEr, ROUGE-L, METEOR)",
                       description="Caption a split free-running and score it at corpus level against all "
                       "references of each photo.")
    _data_options(p)
    p.add_argument("--split", default="dev", choices=("train", "dev", "test"))
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images of the split")
    p.add_argument("--output", metavar="DIR", help="write report.json and per_image.jsonl here")
    p.add_argument("--no-coco", action="store_true", help="skip the pycocoevalcap metrics")
    p.add_argument("--cache-dir", metavar="DIR", help="feature cache (default: $CAPTIONER_HOME/features)")
    _model_option(p)
    _decoding_options(p)

    p = sub.add_parser("export", help="add LiteRT files (and familiarity data) to a model bundle",
                       description="Convert a bundle's encoder and decoder to LiteRT (.tflite) files and record "
                       "them in its config; with --familiarity, also add the data that scores how familiar a "
                       "photo is. Bundles written by `captioner train` have both already.")
    _model_option(p, runtime=False)
    p.add_argument("--int8-calibration", metavar="DIR",
                   help="also write an int8 encoder, calibrated on 200 photos of this dataset's train split")
    p.add_argument("--familiarity", metavar="DIR",
                   help="also add familiarity data from this dataset (the one the model was trained on): "
                   "a reference set of its train photos, a threshold calibrated on its dev photos")
    p.add_argument("--cache-dir", metavar="DIR", help="feature cache for --familiarity "
                   "(default: $CAPTIONER_HOME/features)")

    p = sub.add_parser("ensemble", help="build an ensemble bundle: several models of one encoder captioning together",
                       description=f"Copy 2 to {MAX_MEMBERS} model bundles of one encoder and vocabulary into one ensemble "
                       "bundle, whose decoders' next-word probabilities are averaged at every word. It loads as "
                       "any bundle (--model DIR), on either runtime; its decoding defaults are the first model's, "
                       "and an attention model, if any, must come first.")
    p.add_argument("members", nargs="+", metavar="MODEL", help="model bundle folders or shipped models' names, in order")
    p.add_argument("--output", required=True, metavar="DIR", help="the ensemble bundle folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")

    p = sub.add_parser("make-shapes", help="generate the synthetic shapes dataset (demo and tests)")
    p.add_argument("output", metavar="DIR")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)

    sub.add_parser("encoders", help="list the available image encoders")

    p = sub.add_parser("beam", help="run captioning or feature extraction as an Apache Beam job (needs the beam extra)",
                       description="Apache Beam jobs on any runner: the DirectRunner on this machine (default), "
                       "or Dataflow, Flink, Spark. Options this command does not know (--runner, "
                       "--direct_num_workers, --project, ...) are Beam pipeline options. Output goes to "
                       "PREFIX-<kind>-SSSSS-of-NNNNN files once the job has succeeded.")
    jobs = p.add_subparsers(dest="job", required=True, metavar="JOB", parser_class=_BeamParser)
    j = jobs.add_parser("caption", help="caption photos matching a glob into sharded JSONL",
                        description="Caption every file matching --input (local paths or any store Beam reads, "
                        "e.g. gs://bucket/photos/*.jpg). Rows are those of `captioner caption -o x.jsonl`: "
                        "captioned photos in PREFIX-captions-*.jsonl, unreadable ones with the reason in "
                        "PREFIX-failures-*.jsonl; a bad photo never fails the job.")
    j.add_argument("--input", required=True, metavar="GLOB", help="photos to caption (a file pattern)")
    j.add_argument("--output", required=True, metavar="PREFIX", help="output prefix (local path or store URL)")
    j.add_argument("--overwrite", action="store_true",
                   help="replace existing PREFIX-* output (removed only once the new job has succeeded)")
    j.add_argument("--top", type=int, default=1, metavar="N", help="also give the N best beams (beam search only)")
    j.add_argument("--num-shards", type=int, default=0, metavar="N", help="caption shards (default: the runner's choice)")
    j.add_argument("--batch-size", type=int, default=32, help="photos encoded at once (default 32)")
    j.add_argument("--max-batch-size", type=int, default=64, help="largest batch Beam hands a worker (default 64)")
    j.add_argument("--share-model-across-processes", action="store_true",
                   help="one model per machine instead of per worker process (e.g. one GPU, many workers)")
    _model_option(j)
    _decoding_options(j)
    j = jobs.add_parser("extract-features", help="encode a dataset's photos into sharded TFRecord files",
                        description="Encode a dataset's photos on Beam into PREFIX-features-*.tfrecord with "
                        "PREFIX-manifest.json; `captioner import-features PREFIX` then fills the feature cache "
                        "that `captioner train` reads.")
    _data_options(j)
    j.add_argument("--split", choices=("train", "dev", "test", "all"), default="all")
    j.add_argument("--output", required=True, metavar="PREFIX", help="output prefix (local path or store URL)")
    j.add_argument("--overwrite", action="store_true",
                   help="replace existing PREFIX-* output (removed only once the new job has succeeded)")
    j.add_argument("--num-shards", type=int, default=0, metavar="N", help="feature shards (default: the runner's choice)")
    j.add_argument("--batch-size", type=int, default=32, help="photos encoded at once (default 32)")
    j.add_argument("--encoder", metavar="NAME", help="image encoder (default: efficientnet-lite0)")
    j.add_argument("--encoder-weights", default="default", metavar="W",
                   help="'default' (offline file), 'imagenet' (Keras download) or a .weights.h5 path")

    p = sub.add_parser("import-features", help="put sharded features (from `beam extract-features`) into the cache",
                       description="Stream the TFRecord shards named by PREFIX-manifest.json into the feature "
                       "cache, so `captioner train` and `evaluate` with that cache encode nothing.")
    p.add_argument("prefix", metavar="PREFIX")
    _encoder_options(p)

    from captioner.batching import ServerLimits

    p = sub.add_parser("serve", help="serve captions over HTTP (TensorFlow Serving's predict API and uploads)",
                       description="Serve captions over HTTP: POST /v1/models/captioner:predict (TensorFlow "
                       "Serving's JSON), POST /caption (file uploads), GET /healthz, docs at /docs. Listens on "
                       "the loopback interface unless --host says otherwise. See docs/serve.md.")
    _model_option(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g = p.add_argument_group("limits")
    for f in dataclasses.fields(ServerLimits):
        g.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       metavar="N" if isinstance(f.default, int) else f.name.split("_")[-1].upper(),
                       help=f"{f.metadata['help']} (default {f.default:,})")
    return parser


def decode_options(args: argparse.Namespace, defaults: DecodeOptions = _DEFAULTS) -> DecodeOptions:
    """`defaults` with the decoding flags the user gave; `UsageError` naming the flag if invalid."""
    overrides = {name: getattr(args, name) for name in DECODE_FLAGS if getattr(args, name, None) is not None}
    top = getattr(args, "top", 1)
    overrides["num_results"] = top
    if top > 1 and args.beam_size is None:  # --top 5 asks for 5 beams: widen the default beam if needed
        overrides["beam_size"] = max(top, defaults.beam_size)
    try:
        return dataclasses.replace(defaults, **overrides)
    except OptionError as e:
        flag = DECODE_FLAGS[e.field]
        if e.field == "num_results":
            raise UsageError(f"{flag}: {top} beams need --method beam and at most --beam-size beams") from None
        raise UsageError(f"{flag}: {e.reason}") from None


def _check_model(flag: str, model: str | None) -> None:
    """A usage error unless `model` (a folder or a shipped model's name; None: the default) is a folder."""
    folder = paths.model_dir(model)
    if not folder.is_dir():
        raise UsageError(f"{flag}: {folder}: no such model bundle folder, nor a shipped model's name "
                         f"({', '.join(paths.shipped_models())})")


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without a model, before TensorFlow is imported."""
    if args.command in ("caption", "evaluate") or args.command == "beam" and args.job == "caption":
        decode_options(args)  # for Beam: a bad flag fails here, not on every worker
    if args.command == "train":
        if args.init and not args.scst:
            raise UsageError("--init: starts self-critical training; add --scst")
        if args.scst and args.distribute != "none":
            raise UsageError("--distribute: self-critical training runs on one device")
        if args.scst and (args.train_features or args.dev_features):
            raise UsageError("--train-features: self-critical training reads the feature cache "
                             "(fill it with `captioner import-features PREFIX`)")
        if args.dev_features and not args.train_features:
            raise UsageError("--dev-features: goes with --train-features (features of both splits from shards)")
    if args.command == "beam" and (args.batch_size < 1 or getattr(args, "num_shards", 0) < 0):
        raise UsageError("--batch-size must be at least 1 and --num-shards at least 0")
    # Checked here, passed on as given: a Beam worker, or a message, gets the name the user wrote.
    if hasattr(args, "model") or args.command == "train" and args.scst:
        flag, model = ("--init", args.init) if args.command == "train" else ("--model", args.model)
        _check_model(flag if model else "$CAPTIONER_MODEL", model)
    for member in getattr(args, "members", []):
        _check_model("MODEL", member)
    if args.command == "caption":
        if args.resume and not args.output:
            raise UsageError("--resume: continues an --output file; give -o FILE")
        if args.resume and args.overwrite:
            raise UsageError("--resume and --overwrite: choose one")
        if args.batch_size < 1:
            raise UsageError("--batch-size: must be at least 1")
        if args.save_attention:
            _check_attention_output(args)
    if getattr(args, "data", "") is None:
        args.data = paths.default_data()
        if not Path(args.data).exists():
            raise UsageError(f"--data: no dataset at {args.data} (the default); download Flickr8k there "
                             "(see README, 'Train and evaluate') or give --data DIR")


def _check_attention_output(args: argparse.Namespace) -> None:
    """--save-attention needs a folder to write to and a model with attention (read from the
    bundle's config, without TensorFlow)."""
    from captioner.bundle import load_bundle

    folder = Path(args.save_attention)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--save-attention: {args.save_attention}: exists and is not a folder")
    model = paths.model_dir(args.model)
    bundle = load_bundle(model, load_decoder=False)
    if bundle.members and not bundle.attends:
        raise UsageError(f"--save-attention: {model} is an ensemble without an attention model first, which has "
                         "no attention maps (an ensemble's maps are its first member's)")
    if not bundle.attends:
        raise UsageError(f"--save-attention: {model} is a {bundle.model_type} model, which has no attention maps "
                         "(use a bundle trained with --model-type show-attend-tell)")


def _encoder(args: argparse.Namespace):
    from captioner.encoder import DEFAULT_ENCODER, ImageEncoder

    return ImageEncoder(args.encoder or DEFAULT_ENCODER, args.encoder_weights)


def _cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir) if args.cache_dir else paths.feature_cache_dir()


def cmd_caption(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from captioner import attention_maps
    from captioner.images import iter_image_files
    from captioner.output import RowWriter, display_name, terminal_text

    photos = [str(p) for p in iter_image_files(args.paths, args.recursive)]
    # Named from all photos, so a photo's picture keeps its name when --resume skips others.
    map_names = attention_maps.file_names(photos) if args.save_attention else {}
    writer = RowWriter(args.output, args.top, args.resume, args.overwrite) if args.output else None
    try:
        if writer and writer.done:
            before = len(photos)
            photos = [p for p in photos if display_name(p) not in writer.done]
            print(f"resuming: {before - len(photos)} photos already in {terminal_text(args.output)}", file=sys.stderr)
        if not photos:
            print("nothing to caption", file=sys.stderr)
            return 0
        # Imported here: TensorFlow loads only once there is work to do.
        from captioner.captioner import Captioner

        captioner = Captioner.load(args.model, args.encoder_weights, runtime=args.runtime)
        options = decode_options(args, captioner.options)
        failed = 0
        started = time.time()
        with tqdm(total=len(photos), unit="photo", disable=None, file=sys.stderr) as bar:
            for result in captioner.iter_captions(photos, options, batch_size=args.batch_size):
                bar.update()
                if result.error:
                    failed += 1
                    bar.write(f"error: {terminal_text(result.source)}: {terminal_text(result.error)}", file=sys.stderr)
                if result.unfamiliar:
                    bar.write(f"warning: {terminal_text(result.source)}: {UNFAMILIAR} (familiarity "
                              f"{result.familiarity:.2f}, below the model's {result.familiarity_threshold:.2f})",
                              file=sys.stderr)
                if map_names and result.ok:
                    picture = attention_maps.strip(result.source, result.caption.split(), result.attention)
                    attention_maps.save_png(picture, Path(args.save_attention) / map_names[result.source])
                if writer:
                    writer.write(result)
                elif result.caption is not None:
                    bar.write(f"{terminal_text(result.source)}\t{terminal_text(result.caption)}", file=sys.stdout)
                    if args.top > 1:
                        for rank, beam in enumerate(result.beams, 1):
                            bar.write(f"\t{rank}\tscore {beam.score:7.3f}\tlog-prob {beam.log_prob:7.3f}\t"
                                      f"{terminal_text(beam.caption)}", file=sys.stdout)
    finally:
        if writer:
            writer.close()
    elapsed = time.time() - started
    print(f"captioned {len(photos) - failed} of {len(photos)} photos in {elapsed:.1f} s"
          + (f"; {failed} failed" if failed else "")
          + (f"; attention maps in {terminal_text(args.save_attention)}" if map_names else ""), file=sys.stderr)
    return 1 if failed else 0


def cmd_extract_features(args: argparse.Namespace) -> int:
    from captioner.data import load_dataset
    from captioner.features import FeatureCache, extract_features

    dataset = load_dataset(args.data, args.layout, args.images)
    ids = sorted(dataset.images) if args.split == "all" else dataset.subset(args.split).splits[args.split]
    encoder = _encoder(args)
    if args.grid:
        from captioner.features import GridEncoder

        encoder = GridEncoder(encoder)
    # Every encoder knows its map's shape; only a grid run may file its features as maps.
    cache = FeatureCache(encoder.describe(), _cache_dir(args), grid_shape=encoder.grid_shape if args.grid else None)
    started = time.time()
    _, failures = extract_features([dataset.images[i] for i in ids], encoder, cache, args.batch_size)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    elapsed = time.time() - started
    print(f"{len(ids) - len(failures)} of {len(ids)} photos encoded with {encoder.name} in {elapsed:.1f} s "
          f"({len(ids) / max(elapsed, 1e-9):.1f} photos/s); cache: {cache.directory}")
    return 1 if failures else 0


def cmd_train(args: argparse.Namespace) -> int:
    from captioner.data import load_dataset
    from captioner.train_config import TrainConfig
    from captioner.training import make_strategy, train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
    config = TrainConfig.preset(args.preset or ("scst" if args.scst else "default"), **overrides)
    dataset = load_dataset(args.data, args.layout, args.images)
    if args.scst:
        from captioner.bundle import load_bundle
        from captioner.encoder import ImageEncoder
        from captioner.self_critical import self_critical

        init = load_bundle(paths.model_dir(args.init))
        init.refuse_ensemble("fine-tune")
        encoder = ImageEncoder(args.encoder or init.encoder["name"], args.encoder_weights)
        bundle = self_critical(dataset, init, encoder, args.output, config, _cache_dir(args))
    else:
        if args.train_features:
            from captioner.feature_shards import read_manifest

            args.encoder = args.encoder or read_manifest(args.train_features)["encoder"]["name"]
        bundle = train(dataset, _encoder(args), args.output, config, _cache_dir(args),
                       strategy=make_strategy(args.distribute), train_shards=args.train_features,
                       dev_shards=args.dev_features)
    best = bundle.info.get("best", {})
    print(f"model saved to {Path(args.output) / 'model'}; best epoch {best.get('epoch')}: "
          + ", ".join(f"{k} {v:.3f}" for k, v in best.items() if k != "epoch"))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from captioner.captioner import Captioner
    from captioner.data import load_dataset
    from captioner.evaluation import evaluate

    dataset = load_dataset(args.data, args.layout, args.images)
    captioner = Captioner.load(args.model, args.encoder_weights, cache_dir=_cache_dir(args), runtime=args.runtime)
    report = evaluate(captioner, dataset, args.split, decode_options(args, captioner.options),
                      limit=args.limit, coco=not args.no_coco, output=args.output)
    d = report["decoding"]
    print(f"{report['split']} split, {report['images']} images, {d['method']} decoding, beam {d['beam_size']}:")
    for name, value in report["scores"].items():
        print(f"  {name:12s} {value:6.2f}")
    c = report["captions"]
    print(f"  {c['mean_words']:.1f} words a caption; {c['distinct']} distinct captions of {report['images']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from captioner.bundle import load_bundle
    from captioner.data import load_dataset
    from captioner.export_litert import add_litert_files, calibration_photos

    model = paths.model_dir(args.model)
    bundle = load_bundle(model, load_decoder=False)
    bundle.refuse_ensemble("export")  # before minutes of encoding for --familiarity
    if args.familiarity:
        _export_familiarity(args, model, bundle.encoder)
        if bundle.litert and not args.int8_calibration:
            return 0  # its runtime files stand: reconverting would only drop an int8 encoder
    calibration = None
    if args.int8_calibration:
        calibration = calibration_photos(load_dataset(args.int8_calibration), bundle.encoder["image_size"])
    for name, digest in add_litert_files(model, args.encoder_weights, calibration).items():
        print(f"{Path(model) / name}  sha256 {digest[:16]}")
    return 0


def _export_familiarity(args: argparse.Namespace, model: Path, identity: dict) -> None:
    from captioner.data import load_dataset
    from captioner.encoder import ImageEncoder
    from captioner.familiarity import FILENAME, add_familiarity
    from captioner.features import FeatureCache, encode_photos

    dataset = load_dataset(args.familiarity)
    encoder = ImageEncoder(identity["name"], args.encoder_weights)
    if encoder.describe() != identity:
        raise UsageError(f"--encoder-weights: not the encoder {model} was trained with")
    cache = FeatureCache(identity, _cache_dir(args))
    train, dev = (encode_photos(dataset.images, dataset.subset(split).splits[split], encoder, cache,
                                description=f"Encoding {split} photos")[1] for split in ("train", "dev"))
    familiarity = add_familiarity(model, train, dev)
    print(f"{Path(model) / FILENAME}: {len(familiarity.reference):,} reference photos; threshold "
          f"{familiarity.threshold:.3f} passes {familiarity.dev_pass:.1%} of {familiarity.dev_photos:,} dev photos")


def cmd_ensemble(args: argparse.Namespace) -> int:
    from captioner.bundle import save_ensemble

    if Path(args.output).exists() and not args.overwrite:
        raise UsageError(f"--output: {args.output} exists; add --overwrite to replace it")
    bundle = save_ensemble([paths.model_dir(m) for m in args.members], args.output)
    for name, member in zip(args.members, bundle.members):
        print(f"{member.directory}  <- {name} ({member.model_type})")
    print(f"ensemble of {len(bundle.members)} models written to {args.output}")
    return 0


def cmd_make_shapes(args: argparse.Namespace) -> int:
    from captioner.synthetic import make_shapes_dataset

    path = make_shapes_dataset(args.output, n_images=args.images, seed=args.seed)
    print(f"wrote {args.images} generated photos with captions to {path}")
    return 0


def cmd_encoders(args: argparse.Namespace) -> int:
    from captioner.networks import DEFAULT_ENCODER, available_encoders

    for name in available_encoders():
        print(name + ("  (default)" if name == DEFAULT_ENCODER else ""))
    return 0


def cmd_beam(args: argparse.Namespace) -> int:
    return {"caption": _beam_caption, "extract-features": _beam_extract_features}[args.job](args)


def _beam_caption(args: argparse.Namespace) -> int:
    from functools import partial

    from captioner.beam import CaptionerModelHandler, caption_job

    flags = argparse.Namespace(**{name: getattr(args, name, None) for name in [*DECODE_FLAGS, "top"]})
    handler = CaptionerModelHandler(args.model, args.encoder_weights, partial(decode_options, flags),
                                    args.batch_size, max(args.batch_size, args.max_batch_size),
                                    args.share_model_across_processes)
    started = time.time()
    report = caption_job(args.input, args.output, handler, args.top, args.pipeline_args, args.overwrite,
                         args.num_shards)
    captioned, failed = report.counts.get("captions", 0), report.counts.get("failures", 0)
    print(f"captioned {captioned} of {captioned + failed} photos in {time.time() - started:.1f} s"
          + (f"; {failed} failed (see {args.output}-failures-*.jsonl)" if failed else "")
          + f"; rows in {args.output}-captions-*.jsonl", file=sys.stderr)
    return 1 if failed else 0


def _beam_extract_features(args: argparse.Namespace) -> int:
    from captioner.beam import EncoderModelHandler, features_job
    from captioner.data import load_dataset

    dataset = load_dataset(args.data, args.layout, args.images)
    ids = sorted(dataset.images) if args.split == "all" else dataset.subset(args.split).splits[args.split]
    encoder = _encoder(args)  # its identity goes into the manifest
    handler = EncoderModelHandler(encoder.name, args.encoder_weights, args.batch_size)
    started = time.time()
    report = features_job({i: str(dataset.images[i]) for i in ids}, args.output, encoder.describe(), handler,
                          {"dataset": dataset.describe(), "split": args.split}, args.pipeline_args,
                          args.overwrite, args.num_shards)
    failed = report.counts["failures"]
    print(f"{report.counts['features']} of {len(ids)} photos encoded with {encoder.name} in "
          f"{time.time() - started:.1f} s" + (f"; {failed} failed (see {args.output}-failures-*.jsonl)" if failed else "")
          + f"; manifest {args.output}-manifest.json", file=sys.stderr)
    return 1 if failed else 0


def cmd_import_features(args: argparse.Namespace) -> int:
    from captioner.feature_shards import import_into_cache, read_manifest
    from captioner.features import FeatureCache

    args.encoder = args.encoder or read_manifest(args.prefix)["encoder"]["name"]
    identity = _encoder(args).describe()  # the real encoder's, so features of other weights are refused
    cache = FeatureCache(identity, _cache_dir(args))
    count = import_into_cache(args.prefix, cache, identity)
    print(f"{count} features of {identity['name']} put into {cache.directory}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import ipaddress

    from captioner.batching import ServerLimits

    if not 0 < args.port < 65536:
        raise UsageError(f"--port: must be from 1 to 65535, got {args.port}")
    try:
        limits = ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)})
    except ValueError as e:
        raise UsageError(f"--{str(e).replace('_', '-')}") from None
    # Imported only now: a mistake above costs no wait for TensorFlow.
    import uvicorn

    from captioner.captioner import Captioner
    from captioner.server import create_app

    failed: list[Exception] = []

    def stop(error: Exception) -> None:  # a model that cannot load: no point serving 503s for ever
        failed.append(error)
        server.should_exit = True

    app = create_app(lambda: Captioner.load(args.model, args.encoder_weights, runtime=args.runtime,
                                            cache_items=limits.cache_photos), limits,
                     on_load_error=stop)
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level="info",
        limit_concurrency=4 * limits.max_batch,  # connections beyond it get 503 at once, before any work
        timeout_keep_alive=5,
        # On Ctrl-C or SIGTERM, requests in flight may take their full time before the server stops.
        timeout_graceful_shutdown=int(limits.request_timeout_s) + 5))
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving captions on http://{host}:{args.port} (docs: /docs; ready when /healthz says 200)"
          + ("" if loopback else f"; listening on {args.host}: reachable from other machines"), file=sys.stderr)
    server.run()
    return 2 if failed else 0  # the server has logged why the model could not be loaded


COMMANDS = {"caption": cmd_caption, "extract-features": cmd_extract_features, "train": cmd_train,
            "evaluate": cmd_evaluate, "export": cmd_export, "ensemble": cmd_ensemble, "make-shapes": cmd_make_shapes, "encoders": cmd_encoders,
            "beam": cmd_beam, "import-features": cmd_import_features, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        check_args(args)
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # `captioner caption ... | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:
        # Every error the package raises for bad input (ImageError, BundleError, DatasetError,
        # EncoderError, OutputError, UsageError) is a ValueError with a one-line message;
        # CAPTIONER_DEBUG=1 shows the trace.
        if os.environ.get("CAPTIONER_DEBUG"):
            raise
        from captioner.output import terminal_text

        print(f"captioner: error: {terminal_text(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("captioner: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
