"""TensorFlow and Keras, imported without TensorFlow's C++ start-up notices.

On CPUs where TensorFlow turns oneDNN on by default (AVX-512 with VNNI/BF16, common in the
cloud), importing it prints "oneDNN custom operations are on" twice, each after absl's
"All log messages before absl::InitializeLog() ..." line. They come from C++ static
initialisers that write to file descriptor 2 before `TF_CPP_MIN_LOG_LEVEL` is read, so no
setting hides them, and they would land in the CLI's stderr, in notebook cells and in the
Streamlit terminal. Here the import runs with descriptor 2 captured; those known notices are
dropped and anything else is passed on. oneDNN itself stays on (it is the fast path).

Every captioner module gets TensorFlow and Keras from here: `from captioner.quiet_tensorflow
import keras, tf` (importing `keras` first anywhere would print the notices).
"""
from __future__ import annotations

import os
import re
import sys
import tempfile

# Later C++ log lines (INFO and WARNING) are for TensorFlow's developers; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

START_UP_NOTICES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* rebuild TensorFlow"
)


def _import_with_stderr_filtered() -> None:
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 to capture (e.g. a closed stderr)
        import keras  # noqa: F401
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras  # noqa: F401 - imports TensorFlow, its backend
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        passed_on = [line for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                     if not START_UP_NOTICES.search(line)]
    if passed_on:
        sys.stderr.write("".join(passed_on))


if "tensorflow" not in sys.modules:
    _import_with_stderr_filtered()

import keras  # noqa: E402 - already imported above; these bind the names
import tensorflow as tf  # noqa: E402

__all__ = ["keras", "tf"]
