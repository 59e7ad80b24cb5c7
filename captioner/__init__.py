"""captioner: Show-and-Tell image captioning in Keras 3.

    from captioner import Captioner
    print(Captioner.load().caption("photo.jpg").caption)
"""
__version__ = "0.1.0"
__all__ = ["CaptionResult", "Captioner", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so `captioner --help` does not wait for TensorFlow.
    if name in ("Captioner", "CaptionResult"):
        from captioner import captioner as module

        return getattr(module, name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
