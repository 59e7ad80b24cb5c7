"""Try `train` under `MultiWorkerMirroredStrategy` with two worker processes on this machine.

Keras 3's `fit` fails under that strategy (docs/scale.md, "Several machines"), so captioner
offers no flag for it; rerun this after upgrading Keras or TensorFlow to see whether it still
does. Both workers listen on 127.0.0.1 only and train the tiny model on generated shapes for
2 epochs; each prints its result or its error's last line. Exit code 0 when both finished.

    python scripts/try_multi_worker.py
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import sys
from captioner.quiet_tensorflow import tf

strategy = tf.distribute.MultiWorkerMirroredStrategy()  # reads TF_CONFIG; before any other TF work
from captioner.data import load_dataset
from captioner.encoder import ImageEncoder
from captioner.train_config import TrainConfig
from captioner.training import train

work, index = sys.argv[1], sys.argv[2]
bundle = train(load_dataset(f"{work}/shapes"), ImageEncoder("tiny"), f"{work}/run{index}",
               TrainConfig.preset("tiny", epochs=2), cache_dir=f"{work}/cache{index}", verbose=0, strategy=strategy)
print("trained on", strategy.num_replicas_in_sync, "replicas; best", bundle.info["best"])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    from captioner.synthetic import make_shapes_dataset

    with tempfile.TemporaryDirectory() as work:
        make_shapes_dataset(Path(work) / "shapes", n_images=300, seed=0)
        cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(2)]}
        workers = [subprocess.Popen(
            [sys.executable, "-c", WORKER, work, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
                 "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
            for i in range(2)]
        ok = True
        for i, worker in enumerate(workers):
            try:
                out, err = worker.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                worker.kill()
                out, err = worker.communicate()
                err += "\ntimed out after 600 s"
            lines = [line for line in err.splitlines() if line.strip()]
            print(f"worker {i}: exit {worker.returncode}: "
                  + (out.strip().splitlines()[-1] if worker.returncode == 0 else lines[-1] if lines else "no output"))
            ok &= worker.returncode == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
