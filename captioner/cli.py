"""The `captioner` command: caption photos, extract features, train and evaluate.

Thin by design: every command parses options and calls the package's public API.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

OUTPUT_FIELDS = ("image", "caption", "log_prob", "error")


def _decoding_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--method", choices=("beam", "greedy", "sample"), help="decoding method (default: the model's, beam)")
    g.add_argument("--beam-size", type=int, metavar="K", help="beam width (default: the model's, 3)")
    g.add_argument("--max-len", type=int, metavar="N", help="longest caption in words")
    g.add_argument("--length-penalty", type=float, metavar="A",
                   help="rank finished beams by log-prob / length**A (0 = none; default: the model's, 0.5)")
    g.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (with --method sample)")
    g.add_argument("--seed", type=int, help="random seed for sampling")


def _model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="model bundle directory (default: the shipped model)")
    p.add_argument("--encoder-weights", default="default", metavar="W",
                   help="encoder weights: 'default' (offline file), 'imagenet' (Keras download) or a .weights.h5 path")


def _encoder_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", metavar="NAME",
                   help="image encoder (default: efficientnet-lite0; see `captioner encoders`)")
    p.add_argument("--encoder-weights", default="default", metavar="W",
                   help="'default' (offline file), 'imagenet' (Keras download), 'none' (random) or a .weights.h5 path")
    p.add_argument("--cache-dir", metavar="DIR", help="feature cache (default ~/.cache/captioner/features)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description="Describe photos in English sentences "
                                     "(Show and Tell: a CNN feature initialises an LSTM decoder).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("caption", help="caption photos and folders of photos",
                       description="Caption photos. Rows are written as they are done; an unreadable file is "
                       "reported and skipped; the exit code is 1 if any photo failed.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="photo files and/or folders")
    p.add_argument("-r", "--recursive", action="store_true", help="also look in sub-folders")
    p.add_argument("-o", "--output", metavar="FILE", help="write rows to FILE (.csv or .jsonl) instead of stdout")
    p.add_argument("--resume", action="store_true", help="skip photos already in --output (after an interruption)")
    p.add_argument("--top", type=int, default=1, metavar="N", help="also print the N best beams with log-probs")
    p.add_argument("--batch-size", type=int, default=32, help="photos encoded at once (default 32)")
    _model_option(p)
    _decoding_options(p)

    p = sub.add_parser("extract-features", help="encode a dataset's photos into the feature cache",
                       description="Encode every photo of a dataset once; later training and evaluation "
                       "runs read the cached features.")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder (Flickr8k, Kaggle or Karpathy layout)")
    p.add_argument("--split", choices=("train", "dev", "test", "all"), default="all")
    p.add_argument("--batch-size", type=int, default=32)
    _encoder_options(p)

    p = sub.add_parser("train", help="train a model bundle on a dataset",
                       description="Train the decoder on the train split with teacher forcing; pick the best "
                       "epoch on dev BLEU-4. Rerun the same command to resume an interrupted run.")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder (Flickr8k, Kaggle or Karpathy layout)")
    p.add_argument("--output", required=True, metavar="DIR", help="run folder: the bundle goes to DIR/model")
    p.add_argument("--preset", default="default", help="'default' (the shipped Flickr8k model) or 'tiny' (quick demo)")
    for name, kind, text in [
        ("epochs", int, "maximum epochs"), ("batch-size", int, "captions per step"),
        ("learning-rate", float, "peak Adam learning rate"), ("embed-dim", int, "word embedding size"),
        ("units", int, "LSTM units"), ("num-layers", int, "stacked RNN layers"), ("dropout", float, "dropout rate"),
        ("min-count", int, "keep words seen at least this often"), ("max-len", int, "longest caption in words"),
        ("label-smoothing", float, "label smoothing of the loss"), ("patience", int, "early-stopping patience (epochs)"),
        ("seed", int, "random seed"),
    ]:
        p.add_argument(f"--{name}", type=kind, help=f"{text} (default: from the preset)")
    p.add_argument("--rnn", choices=("lstm", "gru"), help="recurrent cell (default lstm)")
    p.add_argument("--monitor", choices=("bleu", "loss"), help="select the best epoch by dev BLEU-4 or dev loss")
    _encoder_options(p)

    p = sub.add_parser("evaluate", help="score a model on a dataset split (BLEU-1..4, CIDEr, ROUGE-L, METEOR)",
                       description="Caption a split free-running and score it at corpus level against all "
                       "references of each photo.")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder")
    p.add_argument("--split", default="dev", choices=("train", "dev", "test"))
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images of the split")
    p.add_argument("--output", metavar="DIR", help="write report.json and per_image.jsonl here")
    p.add_argument("--no-coco", action="store_true", help="skip the pycocoevalcap metrics")
    p.add_argument("--cache-dir", metavar="DIR", help="feature cache (default ~/.cache/captioner/features)")
    _model_option(p)
    _decoding_options(p)

    p = sub.add_parser("make-shapes", help="generate the synthetic shapes dataset (demo and tests)")
    p.add_argument("output", metavar="DIR")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)

    sub.add_parser("encoders", help="list the available image encoders")
    return parser


def _decode_kwargs(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("method", "beam_size", "max_len", "length_penalty", "temperature", "seed")}


def _encoder(args: argparse.Namespace):
    from captioner.encoder import DEFAULT_ENCODER, ImageEncoder

    return ImageEncoder(args.encoder or DEFAULT_ENCODER, args.encoder_weights)


def _cache_dir(args: argparse.Namespace):
    from captioner.features import DEFAULT_CACHE_DIR

    return args.cache_dir or DEFAULT_CACHE_DIR


class RowWriter:
    """Appends result rows to a CSV or JSONL file, one flushed write per row, so a kill loses
    at most the row being written; `done()` lists the photos already in the file."""

    def __init__(self, path: Path, resume: bool):
        self.path, self.jsonl = path, path.suffix.lower() == ".jsonl"
        if not self.jsonl and path.suffix.lower() != ".csv":
            raise ValueError(f"{path}: output must end in .csv or .jsonl")
        if resume and path.exists():
            self._drop_torn_row()
        elif path.exists():
            path.unlink()
        new = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", encoding="utf-8", newline="")
        if new and not self.jsonl:
            self._write(OUTPUT_FIELDS)

    def _drop_torn_row(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # killed mid-row: keep complete rows only
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def done(self) -> set[str]:
        if not self.path.exists():
            return set()
        with open(self.path, encoding="utf-8", newline="") as f:
            try:
                if self.jsonl:
                    return {json.loads(line)["image"] for line in f if line.strip()}
                return {row["image"] for row in csv.DictReader(f)}
            except (KeyError, TypeError, ValueError, csv.Error) as e:  # e.g. --resume of some other file
                raise ValueError(f"{self.path}: not a captioner output file, cannot resume it "
                                 f"({type(e).__name__}: {e})") from None

    def _write(self, values) -> None:
        if self.jsonl:
            line = json.dumps(dict(zip(OUTPUT_FIELDS, values)), ensure_ascii=False) + "\n"
        else:
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerow(values)
            line = buffer.getvalue()
        self.file.write(line)
        self.file.flush()

    def write(self, result) -> None:
        log_prob = None if result.log_prob is None else round(result.log_prob, 4)
        values = (result.source, result.caption, log_prob, result.error)
        self._write(values if self.jsonl else ["" if v is None else v for v in values])

    def close(self) -> None:
        os.fsync(self.file.fileno())
        self.file.close()


def cmd_caption(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from captioner.images import iter_image_files

    paths = [str(p) for p in iter_image_files(args.paths, args.recursive)]
    writer = RowWriter(Path(args.output), args.resume) if args.output else None
    if writer and args.resume:
        done = writer.done()
        skipped = sum(p in done for p in paths)
        paths = [p for p in paths if p not in done]
        if skipped:
            print(f"resuming: {skipped} photos already in {args.output}", file=sys.stderr)
    if not paths:
        print("nothing to caption", file=sys.stderr)
        return 0
    # Imported here: TensorFlow loads only once there is work to do.
    from captioner.captioner import Captioner

    captioner = Captioner.load(args.model, args.encoder_weights)
    failed = 0
    started = time.time()
    with tqdm(total=len(paths), unit="photo", disable=None, file=sys.stderr) as bar:
        for result in captioner.iter_captions(paths, batch_size=args.batch_size, num_results=args.top,
                                              **_decode_kwargs(args)):
            bar.update()
            if result.error:
                failed += 1
                bar.write(f"error: {result.source}: {result.error}", file=sys.stderr)
            if writer:
                writer.write(result)
            elif result.caption is not None:
                bar.write(f"{result.source}\t{result.caption}", file=sys.stdout)
                for text, log_prob in result.beams[1:]:
                    bar.write(f"\t{log_prob:8.3f}  {text}", file=sys.stdout)
    if writer:
        writer.close()
    elapsed = time.time() - started
    print(f"captioned {len(paths) - failed} of {len(paths)} photos in {elapsed:.1f} s"
          + (f"; {failed} failed" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


def cmd_extract_features(args: argparse.Namespace) -> int:
    from captioner.data import load_dataset
    from captioner.features import FeatureCache, extract_features

    dataset = load_dataset(args.data)
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
    from captioner.training import TrainConfig, train

    overrides = {k: getattr(args, k) for k in ("epochs", "batch_size", "learning_rate", "embed_dim", "units",
                 "num_layers", "dropout", "rnn", "min_count", "max_len", "label_smoothing", "patience",
                 "monitor", "seed")}
    config = TrainConfig.preset(args.preset, **overrides)
    dataset = load_dataset(args.data)
    encoder = _encoder(args)
    bundle = train(dataset, encoder, args.output, config, _cache_dir(args))
    best = bundle.info.get("best", {})
    print(f"model saved to {Path(args.output) / 'model'}; best epoch {best.get('epoch')}: "
          + ", ".join(f"{k} {v:.3f}" for k, v in best.items() if k != "epoch"))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from captioner.captioner import Captioner
    from captioner.data import load_dataset
    from captioner.evaluation import evaluate

    dataset = load_dataset(args.data)
    captioner = Captioner.load(args.model, args.encoder_weights, cache_dir=_cache_dir(args))
    report = evaluate(captioner, dataset, args.split, captioner.options(**_decode_kwargs(args)),
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
    from captioner.encoder import DEFAULT_ENCODER, available_encoders

    for name in available_encoders():
        print(name + ("  (default)" if name == DEFAULT_ENCODER else ""))
    return 0


COMMANDS = {"caption": cmd_caption, "extract-features": cmd_extract_features, "train": cmd_train,
            "evaluate": cmd_evaluate, "make-shapes": cmd_make_shapes, "encoders": cmd_encoders}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # `captioner caption ... | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:
        # Every error the package raises for bad input (ImageError, BundleError, DatasetError,
        # EncoderError) is a ValueError with a one-line message; CAPTIONER_DEBUG=1 shows the trace.
        if os.environ.get("CAPTIONER_DEBUG"):
            raise
        print(f"captioner: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("captioner: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
