"""Batch captioning throughput, end to end, against the usual tutorial implementation.

Phases (in one run, on the same photos and weights; the runtimes are compared in that run):
  cli       `captioner caption PHOTOS -o out.csv --runtime R --beam-size K` in a new process, for each
            runtime and beam width: JPEG files on disk -> captions in a CSV, including starting
            Python, importing and loading the model. images/s, CPU time and the process's peak
            resident memory; and the same command on one photo (what typing it costs).
  latency   one photo at a time through `Captioner.caption(path)` once warm (distinct photos,
            so the feature cache never answers): what the app's upload box sees.
  baseline  the way most Keras captioning tutorials caption: encoder `model.predict` on one
            image, then one `model.predict([feature, tokens so far])` per word, greedy, in a
            Python loop. It must give the same captions as the CLI's greedy (beam 1) run.

    python bench/caption_throughput.py                      # 1,000 photos, beams 1 and 3, tf and litert
    python bench/caption_throughput.py --images 64 --baseline-images 8   # a quick look
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import (
    cpu_seconds,
    machine_info,
    median,
    percentile,
    print_table,
    test_photos,
    timed,
    write_result,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="photos captioned by the CLI per beam width")
    p.add_argument("--beams", default="1,3", help="comma-separated beam widths for the CLI runs")
    p.add_argument("--runtimes", default="tf,litert-float,litert",
                   help="comma-separated runtimes to compare (tf, litert-float, litert)")
    p.add_argument("--batch-size", type=int, default=32, help="the CLI's --batch-size")
    p.add_argument("--baseline-images", type=int, default=50,
                   help="photos captioned by the tutorial implementation (it is slow; a rate needs few)")
    p.add_argument("--latency-photos", type=int, default=30, help="single-photo calls timed once warm")
    p.add_argument("--phases", default="cli,latency,baseline", help="which of cli, latency, baseline to run")
    p.add_argument("--model", metavar="DIR", help="model bundle (default: the shipped model)")
    p.add_argument("--photos", choices=("auto", "flickr8k", "generated"), default="auto",
                   help="Flickr8k photos from $CAPTIONER_DATA or data/flickr8k when present (auto), or generated JPEGs")
    p.add_argument("--workdir", metavar="DIR", help="where CSVs and generated photos go (default: a temp dir)")
    p.add_argument("--output", metavar="FILE", help="result JSON (default bench/results/caption_throughput.json)")
    return p.parse_args(argv)


# `captioner caption` that says its peak memory last. The child reads its own VmHWM: the rusage of a
# forked child would also count the benchmark's pages it started as a copy of.
_REPORT_PEAK = """import sys
from captioner.cli import main
code = main(sys.argv[1:])
from common import _peak_rss_mib
print("peak_rss_mib", _peak_rss_mib(), file=sys.stderr)
sys.exit(code)"""


def run_cli(photos: list[Path], model: str, runtime: str, beam: int, batch_size: int, out_csv: Path) -> dict:
    """`captioner caption` on `photos` in a new process; its wall and CPU time, peak memory and rows."""
    command = [sys.executable, "-c", _REPORT_PEAK, "caption", *map(str, photos), "-o", str(out_csv), "--overwrite",
               "--model", model, "--runtime", runtime, "--beam-size", str(beam), "--batch-size", str(batch_size)]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(common.REPO / "bench"), str(common.REPO)])}
    process = subprocess.Popen(command, cwd=common.REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)  # this child's own CPU time
    seconds = time.perf_counter() - start
    *lines, peak_line = process.stderr.read().decode().splitlines() or [""]
    stderr = "\n".join(lines)
    process.returncode = os.waitstatus_to_exitcode(status)
    with open(out_csv, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if process.returncode != 0 or len(rows) != len(photos) or any(r["error"] for r in rows):
        raise SystemExit(f"captioner caption failed (exit {process.returncode}, {len(rows)} rows for {len(photos)} "
                         f"photos): {stderr[-500:]}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": float(peak_line.split()[-1]) if peak_line.startswith("peak_rss_mib") else None,
            "stderr": stderr, "captions": {r["image"]: r["caption"] for r in rows}}


def warm_latency(captioner, photos: list[Path], warmup: int = 3) -> list[float]:
    """Seconds per `captioner.caption(path)` call on photos it has not seen, after `warmup` calls."""
    for path in photos[:warmup]:
        captioner.caption(str(path))
    times = []
    for path in photos[warmup:]:
        start = time.perf_counter()
        captioner.caption(str(path))
        times.append(time.perf_counter() - start)
    return times


def tutorial_caption(path: Path, encoder, model, vocab, max_len: int) -> str:
    """Caption one photo the way Keras captioning tutorials do (greedy, a `predict` per word).

    The photo is read and preprocessed by the package's own functions and the decoder is the
    bundle's, so the arithmetic is the app's; what differs is how it is driven.
    """
    import numpy as np

    from captioner.images import load_image

    image = load_image(path, encoder.image_size)[None].astype("float32")
    feature = encoder.model.predict(encoder.preprocess(image), verbose=0)
    tokens = [vocab.start_id]
    for _ in range(max_len):
        logits = model.predict([feature, np.array([tokens], np.int32)], verbose=0)[0, -1]
        # The app never emits <pad>, <start> or <unk>; without this the captions could differ.
        logits[[vocab.pad_id, vocab.start_id, vocab.unk_id]] = -np.inf
        word = int(np.argmax(logits))
        if word == vocab.end_id:
            break
        tokens.append(word)
    return vocab.decode(tokens[1:])


def main(argv=None) -> int:
    args = parse_args(argv)
    info = machine_info()
    phases = set(args.phases.split(","))
    beams = [int(b) for b in args.beams.split(",")]
    if "baseline" in phases and 1 not in beams:
        raise SystemExit("the baseline is checked against the beam-1 CLI run: include 1 in --beams")

    from captioner import paths
    from captioner.captioner import Captioner

    model = str(paths.model_dir(args.model))
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(f"{model}: no model bundle; pass --model DIR (see bench/README.md)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_caption_"))
    workdir.mkdir(parents=True, exist_ok=True)
    n_photos = max(args.images, args.latency_photos + 3, args.baseline_images)
    photos, photo_source = test_photos(n_photos, workdir, args.photos)
    print(f"{len(photos)} photos: {photo_source}; model {model}; load average {info['load_average_at_start']}")

    bundle_config = json.loads((Path(model) / "config.json").read_text())
    if "baseline" in phases and "members" in bundle_config:
        raise SystemExit(f"{model}: an ensemble; the tutorial baseline drives one Keras decoder (--phases cli,latency)")
    result: dict = {"machine": info, "config": {**vars(args), "model": model, "photos": photo_source},
                     # An ensemble has no decoder of its own: its members' are in their configs.
                     "model": {"decoder": bundle_config.get("decoder"), "members": bundle_config.get("members"),
                               "encoder": bundle_config["encoder"]["name"],
                               "best": bundle_config.get("info", {}).get("best")}}
    runtimes = args.runtimes.split(",")
    result["matmul"] = common.matmul_gflops()  # this machine's rate, now: figures are read against it
    rows = []
    cli_runs = {}
    if "cli" in phases:
        for runtime in runtimes:
            one = run_cli(photos[:1], model, runtime, beams[-1], args.batch_size, workdir / "one.csv")
            result.setdefault("command_one_photo_seconds", {})[runtime] = one["seconds"]
            for beam in beams:
                run = run_cli(photos[: args.images], model, runtime, beam, args.batch_size,
                              workdir / f"{runtime}-beam{beam}.csv")
                cli_runs[runtime, beam] = run
                # The rate once loaded: meaningful only when the run is much longer than its fixed cost.
                extra = run["seconds"] - one["seconds"]
                steady = (args.images - 1) / extra if extra > one["seconds"] else None
                rows.append({"what": f"CLI, {runtime}, beam {beam}", "images": args.images, "seconds": run["seconds"],
                             "images/s": args.images / run["seconds"], "steady images/s": steady,
                             "CPU ms/image": 1000 * run["cpu_seconds"] / args.images,
                             "peak RSS MiB": run["peak_rss_mib"]})
        result["cli"] = [dict(r) for r in rows]
        if "tf" in runtimes:  # every other runtime against TensorFlow, in this run
            result["vs_tf"] = {}
            for runtime in runtimes:
                for beam in beams:
                    if runtime == "tf":
                        continue
                    a, b = cli_runs["tf", beam], cli_runs[runtime, beam]
                    same = sum(a["captions"][k] == b["captions"][k] for k in a["captions"])
                    result["vs_tf"][f"{runtime}, beam {beam}"] = {"speedup": a["seconds"] / b["seconds"],
                                                                  "same_captions": same, "images": len(a["captions"])}

    captioner = None
    if "latency" in phases:
        result["latency"] = {}
        for runtime in runtimes:
            captioner = Captioner.load(model, runtime=runtime)
            times = warm_latency(captioner, photos[-(args.latency_photos + 3):])
            result["latency"][runtime] = {"calls": len(times), "median_ms": 1000 * median(times),
                                          "p90_ms": 1000 * percentile(times, 90), "max_ms": 1000 * max(times),
                                          "options": captioner.options.to_dict()}
            rows.append({"what": f"Captioner.caption(path), {runtime}, warm", "images": len(times),
                         "seconds": sum(times), "images/s": len(times) / sum(times),
                         "median ms": 1000 * median(times), "p90 ms": 1000 * percentile(times, 90)})

    if "baseline" in phases:
        captioner = Captioner.load(model, runtime="tf")  # the tutorial drives Keras models
        subset = photos[: args.baseline_images]
        bundle, encoder = captioner.bundle, captioner.encoder
        reference = cli_runs["tf", 1]["captions"] if ("tf", 1) in cli_runs else {
            r.source: r.caption for r in captioner.caption([str(p) for p in subset], method="greedy")}
        tutorial_caption(photos[-1], encoder, bundle.model, bundle.vocab, bundle.decoding.max_len)  # traces predict
        cpu = cpu_seconds()
        seconds, captions = timed(lambda: [tutorial_caption(p, encoder, bundle.model, bundle.vocab, bundle.decoding.max_len)
                                           for p in subset])
        cpu = cpu_seconds() - cpu
        mismatches = [(str(p), ours, theirs) for p, theirs in zip(subset, captions)
                      if (ours := reference[str(p)]) != theirs]
        result["baseline"] = {"images": len(subset), "seconds": seconds, "images_per_s": len(subset) / seconds,
                              "cpu_seconds": cpu,
                              "same_captions": len(subset) - len(mismatches), "mismatches": mismatches,
                              "mean_words": sum(len(c.split()) for c in captions) / len(captions)}
        rows.append({"what": "tutorial: predict per image + per word, greedy", "images": len(subset),
                     "seconds": seconds, "images/s": len(subset) / seconds, "CPU ms/image": 1000 * cpu / len(subset)})
        tutorial_rate = len(subset) / seconds
        for row in rows:
            if row["what"].startswith("CLI"):
                result.setdefault("speedup_vs_tutorial", {})[row["what"]] = {
                    "end_to_end": row["images/s"] / tutorial_rate,
                    "steady": row["steady images/s"] and row["steady images/s"] / tutorial_rate,
                    "cpu_time": 1000 * cpu / len(subset) / row["CPU ms/image"]}

    print_table(rows, ["what", "images", "seconds", "images/s", "steady images/s", "CPU ms/image", "peak RSS MiB",
                       "median ms",
                       "p90 ms"], title=f"Captioning (load average at start {info['load_average_at_start']})")
    for key, value in result.get("speedup_vs_tutorial", {}).items():
        steady = f", {value['steady']:.1f}x once loaded" if value["steady"] else ""
        print(f"speed-up over the tutorial implementation, {key}: {value['end_to_end']:.1f}x end to end{steady}, "
              f"{value['cpu_time']:.1f}x less CPU time per image")
    for runtime, seconds in result.get("command_one_photo_seconds", {}).items():
        print(f"`captioner caption --runtime {runtime}` on one photo in a new process: {seconds:.2f} s")
    for what, value in result.get("vs_tf", {}).items():
        print(f"{what} vs TensorFlow: {value['speedup']:.2f}x the photos/s, "
              f"{value['same_captions']} of {value['images']} captions identical")
    m = result["matmul"]
    print(f"this machine's float32 matmul rate in this run: {m['best_gflops']:.0f} GFLOP/s (best of 7)")
    if "baseline" in result:
        b = result["baseline"]
        print(f"tutorial vs CLI greedy: {b['same_captions']} of {b['images']} captions identical")
    write_result("caption_throughput", result, args.output)
    if result.get("baseline", {}).get("mismatches"):
        for path, ours, theirs in result["baseline"]["mismatches"][:5]:
            print(f"  {path}\n    app:      {ours}\n    tutorial: {theirs}", file=sys.stderr)
        raise SystemExit("the tutorial implementation and the app disagree on greedy captions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
