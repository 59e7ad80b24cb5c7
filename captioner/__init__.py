"""captioner: Show-and-Tell image captioning in Keras 3.

    from captioner import Captioner
    print(Captioner.load().caption("photo.jpg").caption)

The public API is importable from here. Names load on first use, so `import captioner` (and
`captioner --help`) does not wait for TensorFlow.
"""
from importlib import import_module

from captioner.version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "Captioner": "captioner.captioner",
    "CaptionResult": "captioner.captioner",
    "Beam": "captioner.captioner",
    "DecodeOptions": "captioner.decoding",
    "Bundle": "captioner.bundle",
    "BundleError": "captioner.bundle",
    "load_bundle": "captioner.bundle",
    "CaptionDataset": "captioner.data",
    "DatasetError": "captioner.data",
    "load_dataset": "captioner.data",
    "ImageError": "captioner.images",
    "load_image": "captioner.images",
    "TrainConfig": "captioner.train_config",
    "train": "captioner.training",
    "evaluate": "captioner.evaluation",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
