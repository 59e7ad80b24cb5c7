"""File helpers: atomic writes (a reader, or a rerun after a crash, never sees half a file) and
content hashes."""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`.

    Works for files and directories; on error the temporary is removed and `path`
    is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # callers create a file or a directory of their own choosing
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if path.is_dir() and tmp.is_dir():
            # rename() cannot replace a non-empty directory: swap via a second name
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(path: str | Path, save: Callable[[Path], None], suffix: str = "") -> None:
    """Call `save(tmp)` (e.g. a Keras or NumPy writer) then rename the result to `path`.

    `suffix` is appended to the temporary name for writers that insist on an extension.
    """
    with atomic_path(path) as tmp:
        target = tmp.with_name(tmp.name + suffix) if suffix else tmp
        try:
            save(target)
            if suffix:
                os.replace(target, tmp)
        finally:
            if suffix and target.exists():
                target.unlink()


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a regular file's bytes (remembered while its size and time stamp stay
    the same); OSError for anything else, since reading a FIFO or a device could block forever."""
    info = os.stat(path)  # OSError for a missing file or a symlink loop, before anything else
    if not stat.S_ISREG(info.st_mode):
        raise OSError(f"{path}: not a regular file")
    return _sha256(Path(os.path.realpath(path)), info.st_size, info.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the key so that a replaced file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
