"""TensorFlow and Keras, imported without TensorFlow's C++ start-up notices.

Every captioner module gets TensorFlow and Keras from here (`from captioner.quiet_tensorflow
import keras, tf`): importing `keras` first anywhere would print the notices that
`captioner.native_logs` filters. oneDNN itself stays on (it is the fast path).
"""
from __future__ import annotations

import os
import sys

from captioner.native_logs import filtered_stderr

# Later C++ log lines (INFO and WARNING) are for TensorFlow's developers; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if "tensorflow" not in sys.modules:
    with filtered_stderr():
        import keras  # noqa: F401 - imports TensorFlow, its backend
        import tensorflow  # noqa: F401

import keras  # noqa: E402 - already imported above; these bind the names
import tensorflow as tf  # noqa: E402

__all__ = ["keras", "tf"]
