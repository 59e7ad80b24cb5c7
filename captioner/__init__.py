"""captioner: Show-and-Tell image captioning in Keras 3."""
__version__ = "0.1.0"
