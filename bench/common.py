"""Shared helpers for the benchmark scripts: machine facts, peak memory, photos, tables, JSON.

Every result file records what the figures depend on (CPU, cores, load average when the run
started, library versions, the command line, the date), because on a shared 2-core machine
the same script can give very different numbers an hour apart.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"

if str(REPO) not in sys.path:  # `python bench/X.py` from a clean clone, without `pip install -e .`
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from captioner import paths  # noqa: E402 - after the path set-up above

FLICKR8K_IMAGES = paths.default_data() / "Flicker8k_Dataset"  # $CAPTIONER_DATA or data/flickr8k


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        return round(kib / 2**20, 1)
    except (OSError, AttributeError):
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "captioner"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """The facts a figure depends on; call it first, so the load average is the one at the start."""
    import keras
    import numpy as np
    import PIL
    from captioner.quiet_tensorflow import tf

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
                     "pillow": PIL.__version__},
        "env": {k: os.environ[k] for k in ("TF_ENABLE_ONEDNN_OPTS", "TF_NUM_INTRAOP_THREADS",
                                           "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS") if k in os.environ},
        "git": _git_commit(),
    }


class PeakRSS:
    """Peak resident memory of this process during a `with` block, in MiB.

    Linux keeps one high-water mark per process (VmHWM); writing 5 to clear_refs resets it
    to the current RSS, so each phase of a script gets its own peak. Elsewhere the value is
    the process's lifetime peak (ru_maxrss), which can only over-state a later phase.
    """

    def __enter__(self) -> PeakRSS:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        self.start_mib = current_rss_mib()
        self.peak_mib = None
        return self

    def __exit__(self, *exc) -> None:
        self.peak_mib = _peak_rss_mib()


def current_rss_mib() -> float:
    return _status_mib("VmRSS") or 0.0


def _status_mib(field: str) -> float | None:
    try:
        kib = int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
        return round(kib / 1024, 1)
    except (OSError, AttributeError):
        return None


def _peak_rss_mib() -> float:
    peak = _status_mib("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)
    return round(peak, 1)


def matmul_gflops(n: int = 2048, repeats: int = 7) -> dict:
    """Best and median GFLOP/s of an n x n float32 matmul in a tf.function (2 n^3 FLOPs)."""
    from captioner.quiet_tensorflow import tf

    a = tf.random.normal((n, n), seed=1)
    b = tf.random.normal((n, n), seed=2)
    matmul = tf.function(lambda x, y: tf.reduce_sum(tf.linalg.matmul(x, y)))  # the sum forces the work
    matmul(a, b).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).numpy()
        times.append(time.perf_counter() - start)
    flops = 2 * n**3
    return {"n": n, "best_gflops": flops / min(times) / 1e9, "median_gflops": flops / sorted(times)[len(times) // 2] / 1e9}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def cpu_seconds() -> float:
    """CPU time used so far by this process, all threads, user + system.

    On a shared machine wall time depends on what else runs; CPU time per image much less,
    so results give both (on an idle machine, images/s <= cores / CPU seconds per image).
    """
    times = os.times()
    return times.user + times.system


def test_photos(n: int, workdir: str | Path, source: str = "auto", seed: int = 0) -> tuple[list[Path], str]:
    """`n` JPEG photos on disk and what they are: Flickr8k's (sorted by name) when
    Flickr8k (`$CAPTIONER_DATA` or data/flickr8k) is there and `source` is "auto" or "flickr8k", else generated ones.

    Generated photos are 500x375 JPEGs (Flickr8k's typical size) of coloured shapes with
    sensor-like noise, so decoding costs about what a real photo's does.
    """
    if source not in ("auto", "flickr8k", "generated"):
        raise ValueError(f"photo source must be auto, flickr8k or generated, got {source!r}")
    if source != "generated" and FLICKR8K_IMAGES.is_dir():
        photos = sorted(FLICKR8K_IMAGES.glob("*.jpg"))
        if len(photos) >= n:
            return photos[:n], f"flickr8k ({FLICKR8K_IMAGES})"
        if source == "flickr8k":
            raise SystemExit(f"{FLICKR8K_IMAGES} has {len(photos)} photos, fewer than the {n} asked for")
    elif source == "flickr8k":
        raise SystemExit(f"{FLICKR8K_IMAGES}: not found")
    return generate_jpegs(n, Path(workdir) / "generated_photos", seed), "generated 500x375 JPEGs"


def generate_jpegs(n: int, directory: Path, seed: int = 0) -> list[Path]:
    """Write (or reuse) `n` generated photo-like JPEGs in `directory`."""
    import numpy as np
    from PIL import Image

    from captioner.synthetic import random_scene, render_scene

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = directory / f"photo_{seed}_{i:05d}.jpg"
        if not path.exists():
            rng = np.random.default_rng((seed, i))
            scene = random_scene(rng)
            pixels = np.asarray(render_scene(scene, 500).resize((500, 375)), np.int16)
            noisy = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(path, quality=90)
        paths.append(path)
    return paths


def print_table(rows: Sequence[dict], columns: Sequence[str] | None = None, title: str | None = None) -> None:
    """A plain fixed-width table of `rows` (dicts), numbers rounded for reading."""
    if not rows:
        return
    columns = list(columns or rows[0].keys())

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return "" if value is None else str(value)

    table = [columns] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    if title:
        print(f"\n{title}")
    for i, r in enumerate(table):
        print("  ".join(v.rjust(w) if i else v.ljust(w) for v, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_result(name: str, payload: dict, output: str | Path | None = None) -> Path:
    """Write `payload` as JSON to `output` or bench/results/<name>.json; returns the path."""
    path = Path(output) if output else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"\nwrote {path}")
    return path


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def median(values: Iterable[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def percentile(values: Iterable[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]
