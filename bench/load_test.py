"""Concurrent caption requests against one shared `Captioner` (issue 7, item 4).

N threads send caption requests to a single `Captioner`, one photo each, as the app's upload box
does: half as JPEG paths, half as decoded arrays, with a bad upload (a truncated JPEG or a text
file) now and then. Every answer must equal the one the same photo gets when captioned alone,
one request at a time; a bad upload must come back as its one-line error; and the resident
memory must stop growing once warm (each round sends photos never seen before, so neither the
feature cache nor luck hides a leak).

    python bench/load_test.py                     # a tiny untrained bundle: under a minute
    python bench/load_test.py --model captioner/assets/models/default --threads 4 --requests 16

Prints a table per round and writes bench/results/load_test.json.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common  # noqa: F401  (puts the repo on sys.path and quiets TF before it loads)
from common import (
    current_rss_mib,
    generate_jpegs,
    machine_info,
    percentile,
    print_table,
    write_result,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", help="model bundle (default: a tiny untrained bundle built here)")
    p.add_argument("--threads", type=int, default=8, help="concurrent requests (default 8)")
    p.add_argument("--requests", type=int, default=24, help="requests per round (default 24)")
    p.add_argument("--rounds", type=int, default=4, help="rounds, each with new photos (default 4)")
    p.add_argument("--bad-every", type=int, default=8, help="every Nth request is a bad upload (0: none)")
    p.add_argument("--max-growth-mib", type=float, default=64.0,
                   help="resident memory may grow this much from the end of round 1 to the end (default 64)")
    p.add_argument("--output", metavar="FILE", help="result JSON (default bench/results/load_test.json)")
    return p.parse_args(argv)


def tiny_captioner():
    """A `Captioner` over an untrained decoder of the tiny preset and the tiny encoder: the same
    code paths as a real model in a fraction of the time (its captions are nonsense, and run to
    the maximum length, which makes each request heavier than a trained model's)."""
    from captioner.bundle import Bundle
    from captioner.captioner import Captioner
    from captioner.decoding import DecodeOptions
    from captioner.encoder import ImageEncoder
    from captioner.synthetic import WORDS
    from captioner.text import SPECIAL_TOKENS, Vocabulary
    from captioner.training import TrainConfig, build_model

    config = TrainConfig.preset("tiny")
    encoder = ImageEncoder("tiny")
    vocab = Vocabulary([*SPECIAL_TOKENS, *sorted(WORDS)])
    bundle = Bundle(build_model(config, len(vocab), encoder.feature_dim), vocab, encoder.describe(),
                    DecodeOptions(max_len=config.max_len))
    return Captioner(bundle, encoder), "tiny (untrained)"


def make_requests(n: int, round_index: int, bad_every: int, workdir: Path) -> list:
    """`n` sources of photos no earlier round used: paths and decoded arrays, some bad uploads."""
    from captioner.images import load_image

    photos = generate_jpegs(n, workdir / "photos", seed=round_index)
    sources: list = []
    for i, path in enumerate(photos):
        if bad_every and i % bad_every == bad_every - 1:
            bad = workdir / "bad" / f"upload_{round_index}_{i}.jpg"
            bad.parent.mkdir(exist_ok=True)
            data = path.read_bytes()
            bad.write_bytes(data[: len(data) // 3] if i % 2 else b"%PDF-1.4 not a photo\n")
            sources.append(str(bad))
        else:
            sources.append(str(path) if i % 2 == 0 else load_image(path))
    return sources


def answer(captioner, source) -> tuple:
    """One request: (caption, log-probability) or ("error", reason), and its latency in seconds."""
    from captioner.images import ImageError

    start = time.perf_counter()
    try:
        result = captioner.caption(source)
        outcome = (result.caption, round(result.log_prob, 4))
    except ImageError as e:
        outcome = ("error", e.reason)
    return outcome, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    info = machine_info()
    started = time.perf_counter()
    from captioner.captioner import Captioner

    if args.model:
        shared = Captioner.load(args.model)
        model_name = args.model
    else:
        shared, model_name = tiny_captioner()
    # The reference answers come from a second Captioner (its own feature cache) over the same
    # weights, one request at a time: nothing the shared one caches can leak into them.
    alone = Captioner(shared.bundle, shared.encoder)

    with tempfile.TemporaryDirectory(prefix="captioner-load-") as tmp:
        workdir = Path(tmp)
        rounds = [make_requests(args.requests, r, args.bad_every, workdir) for r in range(args.rounds)]
        for source in rounds[0][:2]:  # compile the tf.functions before anything is measured
            answer(shared, source)
        gc.collect()
        rss_warm = current_rss_mib()
        rows, mismatches = [], []
        with ThreadPoolExecutor(max_workers=args.threads) as pool:
            for r, sources in enumerate(rounds):
                expected = [answer(alone, s)[0] for s in sources]
                round_start = time.perf_counter()
                results = list(pool.map(lambda s: answer(shared, s), sources))
                seconds = time.perf_counter() - round_start
                gc.collect()
                latencies = [latency for _, latency in results]
                for i, ((got, _), want) in enumerate(zip(results, expected)):
                    if got != want:
                        mismatches.append({"round": r + 1, "request": i, "got": got, "expected": want})
                rows.append({
                    "round": r + 1, "requests": len(sources), "threads": args.threads,
                    "bad uploads": sum(w[0] == "error" for w in expected),
                    "same as alone": sum(got == want for (got, _), want in zip(results, expected)),
                    "seconds": seconds, "requests/s": len(sources) / seconds,
                    "p50 ms": 1000 * percentile(latencies, 50), "p95 ms": 1000 * percentile(latencies, 95),
                    "RSS MiB": current_rss_mib(),
                })
    growth = rows[-1]["RSS MiB"] - rows[0]["RSS MiB"]
    correct = not mismatches
    bounded = growth <= args.max_growth_mib
    print_table(rows, title=f"{args.threads} threads, one shared Captioner ({model_name}); "
                f"RSS {rss_warm:.0f} MiB once warm")
    print(f"\nanswers identical to captioning alone: {'yes' if correct else f'NO, {len(mismatches)} differ'}")
    print(f"RSS growth from round 1 to round {len(rows)}: {growth:+.1f} MiB "
          f"({'bounded' if bounded else 'OVER'} the {args.max_growth_mib:.0f} MiB limit)")
    write_result("load_test", {
        "machine": info, "model": model_name, "threads": args.threads, "requests_per_round": args.requests,
        "rounds": rows, "rss_warm_mib": rss_warm, "rss_growth_mib": round(growth, 1),
        "max_growth_mib": args.max_growth_mib, "correct": correct, "memory_bounded": bounded,
        "mismatches": mismatches[:20], "seconds": round(time.perf_counter() - started, 1),
    }, args.output)
    return 0 if correct and bounded else 1


if __name__ == "__main__":
    sys.exit(main())
