"""Pick decoding settings for a trained bundle on the dev split (never on test).

    python scripts/tune_decoding.py --model runs/f8k/model

Scores greedy decoding and beam search over widths and length penalties with corpus BLEU,
and prints a Markdown table; features come from the cache, so only decoding is timed.
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import replace

from captioner import paths
from captioner.captioner import Captioner
from captioner.data import load_dataset
from captioner.evaluation import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", help="dataset folder (default: $CAPTIONER_DATA or data/flickr8k)")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--beam-sizes", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--length-penalties", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    args = parser.parse_args()

    captioner = Captioner.load(args.model)
    dataset = load_dataset(args.data or paths.default_data())
    settings = [dict(method="greedy")] + [dict(method="beam", beam_size=k, length_penalty=a)
                                          for k, a in itertools.product(args.beam_sizes, args.length_penalties)]
    print(f"{args.split} split, model {args.model}\n")
    print("| decoding | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | seconds |")
    print("|---|---|---|---|---|---|")
    for setting in settings:
        start = time.perf_counter()
        report = evaluate(captioner, dataset, args.split, replace(captioner.options, **setting), coco=False, progress=False)
        name = "greedy" if setting["method"] == "greedy" else f"beam {setting['beam_size']}, α={setting['length_penalty']}"
        scores = " | ".join(f"{report['scores'][f'BLEU-{n}']:.1f}" for n in range(1, 5))
        print(f"| {name} | {scores} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
