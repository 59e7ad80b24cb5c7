"""The shipped model's encoder quantised to int8 by LiteRT's converter: speed and dev BLEU against float.

Calibrates on Flickr8k *train* photos, then captions the dev split twice through the LiteRT runtime,
once with the float encoder the bundle ships and once with the int8 one (each with its own feature
cache), and times both encoders on the same batches in the same run.

    python bench/litert_int8.py                       # 200 calibration photos, the whole dev split
    python bench/litert_int8.py --calibration 50 --limit 200   # a quick look
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import machine_info, matmul_gflops, print_table, write_result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibration", type=int, default=200, help="train photos to calibrate on")
    p.add_argument("--limit", type=int, help="only the first N dev photos")
    p.add_argument("--output", metavar="FILE", help="result JSON (default bench/results/litert_int8.json)")
    return p.parse_args(argv)


def encoder_rate(encoder, photos: np.ndarray, seconds: float = 10.0) -> float:
    encoder(photos[:8])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        encoder(photos)
        done += len(photos)
    return done / (time.perf_counter() - start)


def main(argv=None) -> int:
    args = parse_args(argv)
    info = machine_info()
    from captioner import paths
    from captioner.bundle import load_bundle, write_config
    from captioner.captioner import Captioner
    from captioner.data import load_dataset
    from captioner.encoder import ImageEncoder
    from captioner.evaluation import evaluate
    from captioner.export_litert import calibration_photos, encoder_tflite
    from captioner.images import load_image

    dataset = load_dataset(paths.default_data())
    bundle = load_bundle(paths.SHIPPED_MODEL)
    encoder = ImageEncoder(bundle.encoder["name"])
    calibration = calibration_photos(dataset, encoder.image_size, args.calibration)
    with tempfile.TemporaryDirectory() as tmp:
        int8_dir = Path(shutil.copytree(paths.SHIPPED_MODEL, Path(tmp) / "int8"))
        started = time.perf_counter()
        data = encoder_tflite(encoder, calibration)
        convert_seconds = time.perf_counter() - started
        (int8_dir / "encoder.tflite").write_bytes(data)
        write_config(int8_dir, bundle, {**bundle.litert, "encoder.tflite": hashlib.sha256(data).hexdigest()})
        runs = {"float": Captioner.load(paths.SHIPPED_MODEL, cache_dir=Path(tmp) / "float", runtime="litert-float"),
                "int8": Captioner.load(int8_dir, cache_dir=Path(tmp) / "int8cache", runtime="litert")}
        dev_photos = np.stack([load_image(dataset.images[i], encoder.image_size)
                               for i in dataset.splits["dev"][:32]])
        result = {"machine": info, "config": vars(args), "matmul": matmul_gflops(),
                  "int8_encoder_bytes": len(data), "float_encoder_bytes": (paths.SHIPPED_MODEL / "encoder.tflite").stat().st_size,
                  "convert_seconds": convert_seconds, "runs": {}}
        rows = []
        for name, captioner in runs.items():
            rate = encoder_rate(captioner.encoder, dev_photos)
            report = evaluate(captioner, dataset, "dev", replace(captioner.options), limit=args.limit, coco=True,
                              progress=False)
            result["runs"][name] = {"encoder_photos_per_s": rate, "scores": report["scores"]}
            rows.append({"encoder": name, "photos/s": rate, **{k: report["scores"][k] for k in
                                                               ("BLEU-1", "BLEU-4", "CIDEr")}})
    print_table(rows, title=f"LiteRT encoder, float vs int8 (load average at start {info['load_average_at_start']})")
    drop = result["runs"]["float"]["scores"]["BLEU-4"] - result["runs"]["int8"]["scores"]["BLEU-4"]
    speed = result["runs"]["int8"]["encoder_photos_per_s"] / result["runs"]["float"]["encoder_photos_per_s"]
    result["bleu4_drop"], result["int8_speedup"] = drop, speed
    print(f"int8: {speed:.2f}x the float encoder's photos/s, BLEU-4 {-drop:+.2f} (ship only if the drop is < 0.2)")
    write_result("litert_int8", result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
