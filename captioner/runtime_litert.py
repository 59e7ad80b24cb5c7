"""The LiteRT runtime: a bundle's `encoder.tflite` and `decoder.tflite`, with no TensorFlow.

`LiteRTEncoder` stands in for `ImageEncoder` and `LiteRTStep` is the `StepModel` decoding
drives, so the caption path (images, features, beam search) is the same as under TensorFlow,
only faster to start and to run (XNNPACK kernels). The files are checked against the bundle's
config before use: their SHA-256, then their signatures' shapes. Attention bundles (Show, Attend
and Tell) run here too: the encoder also gives the spatial map, and the decoder's step reads each
image's regions and keys by index (see `captioner.export_litert` for the signatures).
"""
from __future__ import annotations

import os
import threading

import numpy as np

from captioner.bundle import Bundle, BundleError, read_runtime_file
from captioner.native_logs import filtered_stderr

# Images per forward pass: like the TF encoder, small passes stay in the CPU caches.
_FORWARD_BATCH = 8


def available() -> bool:
    """Whether the LiteRT interpreter is installed (wheels exist for Linux x86_64/aarch64, macOS arm64)."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


class _Model:
    """One .tflite file: its signature runners, used by one thread at a time."""

    def __init__(self, bundle: Bundle, filename: str, expected: dict[str, dict[str, list[int | None]]]):
        """`expected`: signature -> tensor -> shape, -1 for a free size, None for one the file decides."""
        from ai_edge_litert.interpreter import Interpreter

        data = read_runtime_file(bundle, filename)
        where = bundle.directory / filename
        try:
            with filtered_stderr():
                self.interpreter = Interpreter(model_content=data, num_threads=len(os.sched_getaffinity(0))
                                               if hasattr(os, "sched_getaffinity") else os.cpu_count())
        except (ValueError, RuntimeError) as e:
            raise BundleError(f"{where}: not a LiteRT model this runtime can run ({str(e).splitlines()[0]})") from None
        signatures = self.interpreter.get_signature_list()
        self.runners = {}
        for name, tensors in expected.items():
            if name not in signatures:
                raise BundleError(f"{where}: has no '{name}' signature")
            runner = self.interpreter.get_signature_runner(name)
            found = {**runner.get_input_details(), **runner.get_output_details()}
            for tensor, shape in tensors.items():
                got = found.get(tensor, {}).get("shape_signature")
                if got is None or len(got) != len(shape) or any(e is not None and g != e for g, e in zip(got, shape)):
                    needs = ", ".join("any" if e is None else str(e) for e in shape)
                    raise BundleError(f"{where}: signature '{name}' has {tensor} {None if got is None else got.tolist()}"
                                      f", the bundle's config needs [{needs}]")
            self.runners[name] = runner
        with filtered_stderr():  # XNNPACK announces itself on the first run: do it now, on a batch of one
            for name, runner in self.runners.items():
                runner(**{tensor: np.zeros([1 if d == -1 else d for d in detail["shape_signature"]], detail["dtype"])
                          for tensor, detail in runner.get_input_details().items()})
        self.lock = threading.Lock()

    def __call__(self, signature: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        with self.lock:  # an interpreter holds its tensors: one call at a time
            return self.runners[signature](**inputs)


class LiteRTEncoder:
    """The bundle's encoder as a LiteRT model: RGB images [N, S, S, 3] -> features [N, D] (and, for
    an attention bundle, their spatial maps: `encode`); its int8 version when the bundle has one
    and `int8` is asked for (2-2.7x faster, see bench/litert_int8.py), else the float one
    (features within 1e-4 of TensorFlow's)."""

    def __init__(self, bundle: Bundle, int8: bool = True):
        self.identity = dict(bundle.encoder)
        self.name, self.image_size = self.identity["name"], self.identity["image_size"]
        self.feature_dim = self.identity["feature_dim"]
        s, d = self.image_size, self.feature_dim
        self.int8 = int8 and "encoder.int8.tflite" in bundle.litert
        outputs = {"features": [-1, d]}
        if bundle.model_type == "show-attend-tell":  # the map's height and width are the network's
            outputs["grid"] = [-1, None, None, d]
        self._model = _Model(bundle, "encoder.int8.tflite" if self.int8 else "encoder.tflite",
                             {"features": {"images": [-1, s, s, 3], **outputs}})
        #: (H, W) of the spatial map for attention bundles (`Captioner` checks it against the decoder), else None
        self.grid_shape: tuple[int, int] | None = None
        if "grid" in outputs:
            h, w = self._model.runners["features"].get_output_details()["grid"]["shape_signature"][1:3]
            self.grid_shape = (int(h), int(w))

    def _batch(self, images) -> np.ndarray:
        batch = np.asarray(images, np.float32)
        if batch.ndim != 4 or batch.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"{self.name} expects images shaped [N, {self.image_size}, {self.image_size}, 3]")
        return batch

    def _passes(self, batch: np.ndarray) -> list[dict[str, np.ndarray]]:
        return [self._model("features", images=batch[i : i + _FORWARD_BATCH]) for i in range(0, len(batch), _FORWARD_BATCH)]

    def __call__(self, images) -> np.ndarray:
        parts = [out["features"] for out in self._passes(self._batch(images))]
        return np.concatenate(parts) if parts else np.zeros((0, self.feature_dim), np.float32)

    def encode(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Pooled features [N, D] and spatial maps [N, H*W, D] (row-major regions) from one pass,
        as `ImageEncoder.encode` gives them (attention bundles only)."""
        if self.grid_shape is None:
            raise ValueError(f"{self.name}: this bundle's encoder file gives no spatial map")
        outs = self._passes(self._batch(images))
        h, w = self.grid_shape
        if not outs:
            return np.zeros((0, self.feature_dim), np.float32), np.zeros((0, h * w, self.feature_dim), np.float32)
        return (np.concatenate([o["features"] for o in outs]),
                np.concatenate([o["grid"] for o in outs]).reshape(-1, h * w, self.feature_dim))

    def describe(self) -> dict:
        """The identity recorded when the file was exported: the bundle's own."""
        return dict(self.identity)


class LiteRTStep:
    """The bundle's decoder `init` and `step` as a LiteRT model (a `StepModel`). For an attention
    bundle the image context is the grids and their keys, as NumPy arrays handed to each step
    whole (one copy into the interpreter per step, never one per beam)."""

    runtime = "litert"

    def __init__(self, bundle: Bundle):
        sizes = bundle.decoder_sizes
        units, d = sizes["units"], sizes["feature_dim"]
        #: which state holds the last step's attention weights (attention bundles only)
        self.attention_state: int | None = None
        if bundle.model_type == "show-attend-tell":
            r, a = sizes["regions"], sizes["attention_dim"]
            widths, self.attention_state = [units, units, r], 2
            init = {"grids": [-1, r, d], "keys": [-1, r, a]}
            reads = {"images": [-1], "keys": [-1, r, a], "regions": [-1, r, d]}
        else:
            widths = [units] * sizes["num_layers"] * (2 if sizes.get("rnn", "lstm") == "lstm" else 1)
            init, reads = {"features": [-1, d]}, {}
        self.n_states = len(widths)
        states = {f"state_{i}": [-1, w] for i, w in enumerate(widths)}
        self._model = _Model(bundle, "decoder.tflite", {
            "init": {**init, **states},
            "step": {"tokens": [-1], **reads, "log_probs": [-1, sizes["vocab_size"]], **states},
        })

    def initial_state(self, features: np.ndarray) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        features = np.asarray(features, np.float32)
        if self.attention_state is None:
            out = self._model("init", features=features)
            return [out[f"state_{i}"] for i in range(self.n_states)], {}
        out = self._model("init", grids=features)
        return [out[f"state_{i}"] for i in range(self.n_states)], {"keys": out["keys"], "regions": features}

    def step(self, tokens: np.ndarray, states: list[np.ndarray], context: dict[str, np.ndarray],
             images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        reads = {"images": np.asarray(images, np.int32), **context} if context else {}
        out = self._model("step", tokens=np.asarray(tokens, np.int32), **reads,
                          **{f"state_{i}": np.ascontiguousarray(s) for i, s in enumerate(states)})
        return out["log_probs"], [out[f"state_{i}"] for i in range(self.n_states)]
