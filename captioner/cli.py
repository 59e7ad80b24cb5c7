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
from captioner.decoding import METHODS, DecodeOptions, OptionError

# DecodeOptions field -> the flag that sets it, for messages that name what the user typed.
DECODE_FLAGS = {"method": "--method", "beam_size": "--beam-size", "max_len": "--max-len",
                "length_penalty": "--length-penalty", "temperature": "--temperature", "seed": "--seed",
                "num_results": "--top"}
_DEFAULTS = DecodeOptions()


class UsageError(ValueError):
    """A bad combination of options, found before any work starts."""


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


def _model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="model bundle directory (default: $CAPTIONER_MODEL or the shipped model)")
    p.add_argument("--encoder-weights", default="default", metavar="W",
                   help="encoder weights: 'default' (offline file), 'imagenet' (Keras download) or a .weights.h5 path")


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

    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="'default' (the shipped Flickr8k model) or 'tiny' (quick demo)")
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
    _model_option(p)
    _decoding_options(p)

    p = sub.add_parser("extract-features", help="encode a dataset's photos into the feature cache",
                       description="Encode every photo of a dataset once; later training and evaluation "
                       "runs read the cached features.")
    _data_options(p)
    p.add_argument("--split", choices=("train", "dev", "test", "all"), default="all")
    p.add_argument("--batch-size", type=int, default=32)
    _encoder_options(p)

    p = sub.add_parser("train", help="train a model bundle on a dataset",
                       description="Train the decoder on the train split with teacher forcing; pick the best "
                       "epoch on dev BLEU-4. Rerun the same command to resume an interrupted run.")
    _data_options(p)
    p.add_argument("--output", required=True, metavar="DIR", help="run folder: the bundle goes to DIR/model")
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

    p = sub.add_parser("make-shapes", help="generate the synthetic shapes dataset (demo and tests)")
    p.add_argument("output", metavar="DIR")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)

    sub.add_parser("encoders", help="list the available image encoders")

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


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without a model, before TensorFlow is imported."""
    if args.command in ("caption", "evaluate"):
        decode_options(args)
        if args.model and not Path(args.model).is_dir():
            raise UsageError(f"--model: {args.model}: no such model bundle folder")
    if args.command == "caption":
        if args.resume and not args.output:
            raise UsageError("--resume: continues an --output file; give -o FILE")
        if args.resume and args.overwrite:
            raise UsageError("--resume and --overwrite: choose one")
        if args.batch_size < 1:
            raise UsageError("--batch-size: must be at least 1")
    if getattr(args, "data", "") is None:
        args.data = paths.default_data()
        if not Path(args.data).exists():
            raise UsageError(f"--data: no dataset at {args.data} (the default); download Flickr8k there "
                             "(see README, 'Train and evaluate') or give --data DIR")


def _encoder(args: argparse.Namespace):
    from captioner.encoder import DEFAULT_ENCODER, ImageEncoder

    return ImageEncoder(args.encoder or DEFAULT_ENCODER, args.encoder_weights)


def _cache_dir(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir) if args.cache_dir else paths.feature_cache_dir()


def cmd_caption(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from captioner.images import iter_image_files
    from captioner.output import RowWriter, display_name, terminal_text

    photos = [str(p) for p in iter_image_files(args.paths, args.recursive)]
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

        captioner = Captioner.load(args.model, args.encoder_weights)
        options = decode_options(args, captioner.options)
        failed = 0
        started = time.time()
        with tqdm(total=len(photos), unit="photo", disable=None, file=sys.stderr) as bar:
            for result in captioner.iter_captions(photos, options, batch_size=args.batch_size):
                bar.update()
                if result.error:
                    failed += 1
                    bar.write(f"error: {terminal_text(result.source)}: {terminal_text(result.error)}", file=sys.stderr)
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
          + (f"; {failed} failed" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def cmd_extract_features(args: argparse.Namespace) -> int:
    from captioner.data import load_dataset
    from captioner.features import FeatureCache, extract_features

    dataset = load_dataset(args.data, args.layout, args.images)
    ids = sorted(dataset.images) if args.split == "all" else dataset.subset(args.split).splits[args.split]
    encoder = _encoder(args)
    cache = FeatureCache(encoder.describe(), _cache_dir(args))
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
    from captioner.training import train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
    config = TrainConfig.preset(args.preset, **overrides)
    dataset = load_dataset(args.data, args.layout, args.images)
    bundle = train(dataset, _encoder(args), args.output, config, _cache_dir(args))
    best = bundle.info.get("best", {})
    print(f"model saved to {Path(args.output) / 'model'}; best epoch {best.get('epoch')}: "
          + ", ".join(f"{k} {v:.3f}" for k, v in best.items() if k != "epoch"))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from captioner.captioner import Captioner
    from captioner.data import load_dataset
    from captioner.evaluation import evaluate

    dataset = load_dataset(args.data, args.layout, args.images)
    captioner = Captioner.load(args.model, args.encoder_weights, cache_dir=_cache_dir(args))
    report = evaluate(captioner, dataset, args.split, decode_options(args, captioner.options),
                      limit=args.limit, coco=not args.no_coco, output=args.output)
    d = report["decoding"]
    print(f"{report['split']} split, {report['images']} images, {d['method']} decoding, beam {d['beam_size']}:")
    for name, value in report["scores"].items():
        print(f"  {name:12s} {value:6.2f}")
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


def cmd_serve(args: argparse.Namespace) -> int:
    import ipaddress

    from captioner.batching import ServerLimits

    if args.model and not Path(args.model).is_dir():
        raise UsageError(f"--model: {args.model}: no such model bundle folder")
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

    app = create_app(lambda: Captioner.load(args.model, args.encoder_weights), limits, on_load_error=stop)
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
            "evaluate": cmd_evaluate, "make-shapes": cmd_make_shapes, "encoders": cmd_encoders,
            "serve": cmd_serve}


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
