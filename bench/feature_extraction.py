"""Feature extraction: images/s per backbone, the cached second run, and where the encoder's time goes.

Phases:
  extract   `captioner.features.extract_features` (what `captioner extract-features` and training
            run) over N JPEGs into an empty on-disk cache, then again with a fresh cache object
            over the same directory (every feature read from disk), per backbone whose
            weights are on this machine.
  profile   the default encoder taken apart: JPEG decoding alone (one thread, and the package's
            tf.data pipeline), the network alone per batch size (1/8/32/64), under XLA,
            `model.predict`, TF thread settings and oneDNN on/off (each in a fresh process,
            since TensorFlow fixes them at start-up), and other runtimes for the frozen
            network (TFLite/XNNPACK; onnxruntime when installed: a bench-only experiment).

    python bench/feature_extraction.py                        # 500 photos, all phases
    python bench/feature_extraction.py --images 64 --phases profile
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (puts the repo on sys.path and quiets TF before it loads)
from common import (
    PeakRSS,
    cpu_seconds,
    machine_info,
    matmul_gflops,
    print_table,
    test_photos,
    timed,
    write_result,
)

BACKBONES = ("efficientnet-lite0", "mobilenetv2-tv", "efficientnet-lite2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500, help="photos per extraction run")
    p.add_argument("--encoders", default=",".join(BACKBONES), help="backbones for the extract phase")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the extract phase (the CLI's default)")
    p.add_argument("--profile-images", type=int, default=128, help="images per measurement in the profile phase")
    p.add_argument("--phases", default="extract,profile")
    p.add_argument("--photos", choices=("auto", "flickr8k", "generated"), default="auto")
    p.add_argument("--workdir", metavar="DIR", help="cache and generated photos (default: a temp dir)")
    p.add_argument("--output", metavar="FILE", help="result JSON (default bench/results/feature_extraction.json)")
    # One compute measurement in this process, printed as JSON: how the profile runs thread settings.
    p.add_argument("--compute-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--intra", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--inter", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def encoder_rate(fn, pixels, batch: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of `fn` over `pixels` in batches of `batch`, after one
    untimed call per shape."""
    fn(pixels[:batch])
    if len(pixels) % batch:
        fn(pixels[: len(pixels) % batch])
    start, cpu = time.perf_counter(), cpu_seconds()
    for i in range(0, len(pixels), batch):
        fn(pixels[i : i + batch])
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return len(pixels) / seconds, 1000 * cpu / len(pixels)


def one_pass(encoder):
    """The encoder's network run as one forward pass over whatever batch it is given (calling
    the encoder itself would split the batch into its own passes of 8)."""
    import numpy as np

    return lambda batch: encoder._features_fn(batch.astype(np.float32, copy=False)).numpy()


def network_gflop(model) -> float:
    """Forward GFLOP per image (multiply-add = 2) of the convolutions and dense layers."""
    from keras import layers

    total = 0
    for layer in model.layers:
        if hasattr(layer, "layers"):  # a nested model (mobilenetv2-tv's padded stem)
            total += network_gflop(layer) * 1e9
        elif isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D)):
            _, h, w, c_out = layer.output.shape
            c_in = 1 if isinstance(layer, layers.DepthwiseConv2D) else layer.input.shape[-1]
            total += 2 * h * w * layer.kernel_size[0] * layer.kernel_size[1] * c_in * c_out
        elif isinstance(layer, layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return total / 1e9


def random_pixels(n: int, size: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def extract_phase(photos: list[Path], names: list[str], batch_size: int, workdir: Path) -> list[dict]:
    import numpy as np

    from captioner.encoder import EncoderError, ImageEncoder
    from captioner.features import FeatureCache, extract_features

    rows = []
    for name in names:
        try:
            encoder = ImageEncoder(name)
        except EncoderError as e:
            print(f"skipping {name}: {e}")
            rows.append({"encoder": name, "skipped": str(e)})
            continue
        cache_dir = Path(tempfile.mkdtemp(prefix=f"cache_{name}_", dir=workdir))
        sources = [str(p) for p in photos]
        extract_features(sources[:batch_size], encoder, None, batch_size, progress=False)  # trace, warm up
        cpu = cpu_seconds()
        with PeakRSS() as memory:
            first, (_, failures) = timed(lambda: extract_features(
                sources, encoder, FeatureCache(encoder.describe(), cache_dir), batch_size, progress=False))
        cpu = cpu_seconds() - cpu
        second, (cached, _) = timed(lambda: extract_features(
            sources, encoder, FeatureCache(encoder.describe(), cache_dir), batch_size, progress=False))
        if failures or np.isnan(cached).any():
            raise SystemExit(f"{name}: extraction failed: {failures[:3]}")
        rows.append({"encoder": name, "images": len(photos), "first run s": first,
                     "images/s": len(photos) / first, "CPU ms/image": 1000 * cpu / len(photos), "cached run s": second,
                     "cached images/s": len(photos) / second, "peak RSS MiB": memory.peak_mib})
    return rows


class _NoEncoder:
    """Stands in for an encoder so the tf.data pipeline's decoding can be timed alone."""

    def __init__(self, size: int):
        self.image_size, self.feature_dim = size, 1

    def __call__(self, pixels):
        import numpy as np

        return np.zeros((len(pixels), 1), np.float32)


def compute_in_subprocess(intra: int, inter: int, onednn: str | None, images: int, batch: int) -> dict:
    env = dict(os.environ)
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    command = [sys.executable, __file__, "--compute-only", "--intra", str(intra), "--inter", str(inter),
               "--profile-images", str(images), "--batch-size", str(batch)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compute_only(args: argparse.Namespace) -> int:
    import tensorflow as tf

    if args.intra:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra)
    if args.inter:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter)
    from captioner.encoder import ImageEncoder

    encoder = ImageEncoder()
    rate, cpu_ms = encoder_rate(one_pass(encoder), random_pixels(args.profile_images, encoder.image_size),
                                args.batch_size)
    print(json.dumps({"images_per_s": rate, "cpu_ms_per_image": cpu_ms}))
    return 0


def tflite_rates(encoder, pixels, batches: list[int], threads: int) -> dict | None:
    """(images/s, CPU ms per image) per batch size of the frozen network converted to TFLite
    (XNNPACK delegate), and its largest difference from TensorFlow's features."""
    import numpy as np
    import tensorflow as tf

    try:
        fn = encoder._features_fn.get_concrete_function()
        converter = tf.lite.TFLiteConverter.from_concrete_functions([fn], encoder._features_fn)
        interpreter = tf.lite.Interpreter(model_content=converter.convert(), num_threads=threads)
    except Exception as e:  # noqa: BLE001 - TFLite is optional here; report why it did not run
        print(f"TFLite skipped: {str(e).splitlines()[0][:200]}")
        return None
    index = interpreter.get_input_details()[0]["index"]
    output = interpreter.get_output_details()[0]["index"]

    def run(batch):
        if tuple(interpreter.get_input_details()[0]["shape"]) != batch.shape:
            interpreter.resize_tensor_input(index, batch.shape)
            interpreter.allocate_tensors()
        interpreter.set_tensor(index, batch.astype(np.float32))
        interpreter.invoke()
        return interpreter.get_tensor(output)

    difference = float(np.abs(run(pixels[:8]) - encoder(pixels[:8])).max())
    return {"by_batch": {b: encoder_rate(run, pixels, b) for b in batches}, "max_abs_difference": difference}


def onnx_rates(encoder, pixels, batches: list[int], workdir: Path) -> dict | None:
    """(images/s, CPU ms per image) per batch size of the frozen network under onnxruntime, and
    its largest difference from TensorFlow's features (bench-only: not a package dependency)."""
    try:
        import onnxruntime as ort
        import tensorflow as tf
        import tf2onnx
    except ImportError:
        print("onnxruntime skipped: pip install onnxruntime tf2onnx")
        return None
    import numpy as np

    path = workdir / "encoder.onnx"
    spec = [tf.TensorSpec([None, encoder.image_size, encoder.image_size, 3], tf.float32, name="images")]
    function = tf.function(encoder._features)
    tf2onnx.convert.from_function(function, input_signature=spec, opset=17, output_path=str(path))
    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(batch):
        return session.run(None, {name: batch.astype(np.float32)})[0]

    difference = float(np.abs(run(pixels[:8]) - encoder(pixels[:8])).max())
    return {"by_batch": {b: encoder_rate(run, pixels, b) for b in batches}, "max_abs_difference": difference}


def profile_phase(photos: list[Path], n: int, workdir: Path) -> dict:
    import tensorflow as tf

    from captioner.encoder import ImageEncoder
    from captioner.features import iter_features
    from captioner.images import load_image

    encoder = ImageEncoder()
    size, sources = encoder.image_size, [str(p) for p in photos[:n]]
    gflop = network_gflop(encoder.model)
    out: dict = {"images": n, "network_gflop_per_image": gflop, "matmul": matmul_gflops()}
    peak = out["matmul"]["best_gflops"]
    print(f"{encoder.name}: {gflop:.2f} GFLOP per image; float32 matmul {peak:.0f} GFLOP/s "
          f"-> at most {peak / gflop:.0f} images/s")
    rows: list[dict] = []
    cores = len(os.sched_getaffinity(0))

    def add(what: str, measured: tuple[float, float] | float, network: bool = True) -> None:
        rate, cpu_ms = measured if isinstance(measured, tuple) else (measured, None)
        row = {"what": what, "images/s": rate, "CPU ms/image": cpu_ms}
        if network:  # the arithmetic it achieves against the machine's matmul rate
            row.update({"GFLOP/s": rate * gflop, "of matmul": f"{100 * rate * gflop / peak:.0f}%"})
        rows.append(row)
        print(f"  {rate:7.1f} images/s  {what}", flush=True)  # a long profile shows progress

    seconds, _ = timed(lambda: [load_image(s, size) for s in sources])
    add("JPEG decode + resize, one thread", n / seconds, network=False)
    seconds, _ = timed(lambda: sum(len(b.indices) for b in iter_features(sources, _NoEncoder(size), None, 32)))
    add("JPEG decode + resize + hash, iter_features pipeline", n / seconds, network=False)

    pixels = random_pixels(n, size)
    for batch in (1, 4, 8, 16, 32, 64):
        add(f"network, tf.function, one pass of {batch}", encoder_rate(one_pass(encoder), pixels, batch))
    xla = tf.function(encoder._features, jit_compile=True)
    add("network, XLA (jit_compile), batch 32", encoder_rate(lambda b: xla(tf.constant(b, tf.float32)), pixels, 32))

    def predict(batch):
        return encoder.model.predict(encoder.preprocess(batch.astype("float32")), verbose=0, batch_size=32)

    add("network, model.predict, batch 32", encoder_rate(predict, pixels, 32))
    for intra, inter, onednn in ((0, 0, None), (cores, 1, None), (1, 1, None), (cores, cores, None), (0, 0, "0")):
        label = f"intra {intra or 'default'}, inter {inter or 'default'}" + (", oneDNN off" if onednn == "0" else "")
        measured = compute_in_subprocess(intra, inter, onednn, n, 32)
        add(f"network, batch 32, new process: {label}", (measured["images_per_s"], measured["cpu_ms_per_image"]))

    for runtime, measured in (("TFLite (XNNPACK)", tflite_rates(encoder, pixels, [1, 8, 32], cores)),
                              ("onnxruntime", onnx_rates(encoder, pixels, [1, 32], workdir))):
        if measured is not None:
            out[runtime] = {"max_abs_difference_from_tf": measured["max_abs_difference"]}
            for batch, rate in measured["by_batch"].items():
                add(f"{runtime}, {cores} threads, batch {batch}", rate)

    for batch in (32, 64):
        cpu = cpu_seconds()
        seconds, _ = timed(lambda: sum(len(b.indices) for b in iter_features(sources, encoder, None, batch)))
        add(f"decode + network, iter_features, batch {batch}", (n / seconds, 1000 * (cpu_seconds() - cpu) / n))
    out["rows"] = rows
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compute_only:
        return compute_only(args)
    info = machine_info()
    phases = set(args.phases.split(","))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_features_"))
    workdir.mkdir(parents=True, exist_ok=True)
    photos, source = test_photos(max(args.images, args.profile_images), workdir, args.photos)
    print(f"{len(photos)} photos: {source}; load average {info['load_average_at_start']}")
    result: dict = {"machine": info, "config": {**vars(args), "photos": source}}

    if "extract" in phases:
        rows = extract_phase(photos[: args.images], args.encoders.split(","), args.batch_size, workdir)
        result["extract"] = rows
        print_table([r for r in rows if "skipped" not in r],
                    ["encoder", "images", "first run s", "images/s", "CPU ms/image", "cached run s", "cached images/s", "peak RSS MiB"],
                    title=f"Feature extraction, batch {args.batch_size} (load average at start "
                          f"{info['load_average_at_start']})")
    if "profile" in phases:
        result["profile"] = profile_phase(photos, args.profile_images, workdir)
        print_table(result["profile"]["rows"], ["what", "images/s", "CPU ms/image", "GFLOP/s", "of matmul"],
                    title=f"Where the default encoder's time goes, {args.profile_images} images")
    write_result("feature_extraction", result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
