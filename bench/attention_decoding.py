"""Decoding speed of Show, Attend and Tell against Show and Tell, from cached features, in one run.

Both decoders have random weights at the real sizes (vocabulary 2,538, embedding and LSTM 512;
attention 512 over EfficientNet-Lite0's 7x7x1280 map; Show and Tell reads its pooled 1,280-d
vector) and decode random features the way `Captioner` does: 32 photos per `decode` call. Random
weights never end a sentence early, so every caption runs to `--max-len` words (12 by default,
a Flickr8k caption's length): the two decoders take the same number of steps, and the ratio is
the cost of a step. Encoding is not timed.

    python bench/attention_decoding.py                        # beam 1 and 3, 96 photos, TensorFlow
    python bench/attention_decoding.py --runtimes tf,litert   # the LiteRT decoders too (exported first)
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info, print_table, write_result

VOCAB, UNITS, EMBED, ATTENTION, REGIONS, CHANNELS = 2538, 512, 512, 512, 49, 1280


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=96, help="photos decoded per model and beam width")
    p.add_argument("--beams", default="1,3", help="comma-separated beam widths")
    p.add_argument("--max-len", type=int, default=12, help="words per caption (random weights never stop earlier)")
    p.add_argument("--batch-size", type=int, default=32, help="photos per decode call (Captioner's default)")
    p.add_argument("--runtimes", default="tf", help="comma-separated: tf, litert (litert exports the decoders first)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per case; the best is reported")
    p.add_argument("--output", metavar="FILE", help="result JSON (default bench/results/attention_decoding.json)")
    return p.parse_args(argv)


def step_models(runtimes: list[str], workdir: Path) -> dict[tuple[str, str], object]:
    """(model type, runtime) -> a StepModel over random weights at the real sizes."""
    from captioner.model import ShowAndTell, ShowAttendTell
    from captioner.runtime_tf import TensorFlowStep

    models = {"show-and-tell": ShowAndTell(VOCAB, CHANNELS, embed_dim=EMBED, units=UNITS),
              "show-attend-tell": ShowAttendTell(VOCAB, CHANNELS, REGIONS, embed_dim=EMBED, units=UNITS,
                                                 attention_dim=ATTENTION)}
    out = {}
    for kind, model in models.items():
        for runtime in runtimes:
            if runtime == "tf":
                out[kind, runtime] = TensorFlowStep(model)
            elif runtime == "litert":
                out[kind, runtime] = litert_step(model, workdir / kind)
            else:
                raise SystemExit(f"unknown runtime {runtime!r}")
    return out


def litert_step(model, directory: Path):
    """The decoder exported to LiteRT in a bundle of its own, loaded as the LiteRT runtime does."""
    from captioner.bundle import Bundle, load_bundle, write_config
    from captioner.export_litert import decoder_tflite
    from captioner.fileio import atomic_write_bytes
    from captioner.runtime_litert import LiteRTStep
    from captioner.text import SPECIAL_TOKENS, Vocabulary

    vocab = Vocabulary([*SPECIAL_TOKENS, *(f"w{i}" for i in range(VOCAB - len(SPECIAL_TOKENS)))])
    identity = {"name": "efficientnet-lite0", "weights_id": "random", "image_size": 224, "feature_dim": CHANNELS}
    bundle = Bundle(model, vocab, identity)
    bundle.save(directory)
    data = decoder_tflite(model)
    atomic_write_bytes(directory / "decoder.tflite", data)
    write_config(directory, bundle, {"decoder.tflite": hashlib.sha256(data).hexdigest()})
    return LiteRTStep(load_bundle(directory, load_decoder=False))


def main(argv=None) -> int:
    args = parse_args(argv)
    info = machine_info()
    import numpy as np

    from captioner.decoding import DecodeOptions, decode

    beams, runtimes = [int(b) for b in args.beams.split(",")], args.runtimes.split(",")
    rng = np.random.default_rng(0)
    # Post-ReLU6-like activations; the pooled vector is the map's mean, as the encoder gives it.
    grids = (rng.random((args.photos, REGIONS, CHANNELS), np.float32) * 2).astype(np.float16).astype(np.float32)
    inputs = {"show-and-tell": grids.mean(axis=1), "show-attend-tell": grids}
    with tempfile.TemporaryDirectory() as workdir:
        models = step_models(runtimes, Path(workdir))
        rows, rates = [], {}
        for beam in beams:
            options = DecodeOptions("beam", beam_size=beam, max_len=args.max_len)
            for (kind, runtime), step in models.items():
                features = inputs[kind]
                decode(step, features[: args.batch_size], options)  # traces / warms up
                best = float("inf")
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    for i in range(0, len(features), args.batch_size):
                        hyps = decode(step, features[i : i + args.batch_size], options)
                    best = min(best, time.perf_counter() - start)
                words = sum(len(h[0].ids) for h in hyps) / len(hyps)
                rates[kind, runtime, beam] = args.photos / best
                rows.append({"model": kind, "runtime": runtime, "beam": beam, "photos": args.photos,
                             "seconds": best, "photos/s": args.photos / best, "words": words})
    ratios = {f"{runtime}, beam {beam}": rates["show-and-tell", runtime, beam] / rates["show-attend-tell", runtime, beam]
              for runtime in runtimes for beam in beams}
    print_table(rows, ["model", "runtime", "beam", "photos", "seconds", "photos/s", "words"],
                title=f"Decoding cached features (load average at start {info['load_average_at_start']})")
    for what, ratio in ratios.items():
        print(f"{what}: Show and Tell decodes {ratio:.2f}x the photos/s of Show, Attend and Tell")
    write_result("attention_decoding", {"machine": info, "config": vars(args), "rows": rows,
                                        "show_and_tell_over_attention": ratios}, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
