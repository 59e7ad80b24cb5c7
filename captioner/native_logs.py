"""Native libraries' start-up notices, kept out of what a user reads.

TensorFlow and LiteRT write a few notices from C++ straight to file descriptor 2 when they load
(on AVX-512 CPUs TensorFlow's "oneDNN custom operations are on", twice, each after absl's
"All log messages before absl::InitializeLog() ..."; LiteRT's "Created TensorFlow Lite XNNPACK
delegate for CPU"). They come before any log-level setting is read, so no setting hides them.
`filtered_stderr` runs a block with descriptor 2 captured, drops those known lines and passes
anything else on.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

NOTICES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* rebuild TensorFlow"
    r"|Created TensorFlow Lite XNNPACK delegate for CPU"
    r"|fully_quantize: \d+, inference_type: \d+"  # the LiteRT converter's int8 calibration
)


@contextmanager
def filtered_stderr() -> Iterator[None]:
    """Run the block with the native notices in `NOTICES` removed from stderr."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no descriptor 2 to capture (e.g. a closed stderr)
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            passed_on = [line for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                         if not NOTICES.search(line)]
            if passed_on:
                sys.stderr.write("".join(passed_on))
