"""Robust photo loading: any file a user has becomes an upright RGB array, or an `ImageError`."""
from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# The only Pillow plugins a file is handed to, whatever its name. Pillow knows ~40 formats; some
# run external programs on the file (EPS: Ghostscript) or are rarely exercised parsers, so an
# upload is never offered to them. "JPEG" also opens the phone JPEGs Pillow calls MPO (extra
# preview frames): they share one plugin, and Pillow has no separate "MPO" opener to list.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_SUPPORTED = "JPEG, PNG, WebP, BMP, GIF or TIFF"
# Magic numbers of formats people do try to caption, to name them in the refusal. Read by us,
# never by Pillow: its plugin for the format must not parse an untrusted file.
_REFUSED_MAGIC = (
    (b"%!PS", "an EPS/PostScript file"),
    (b"\xc5\xd0\xd3\xc6", "an EPS/PostScript file"),  # DOS EPS binary header
    (b"%PDF", "a PDF file"),
    (b"8BPS", "a Photoshop (PSD) file"),
    (b"\x00\x00\x01\x00", "an icon (ICO) file"),
    (b"icns", "a macOS icon (ICNS) file"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "a JPEG 2000 file"),
    (b"\xffO\xffQ", "a JPEG 2000 file"),  # bare codestream
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "a JPEG XL file"),
)
_HEIF_BRANDS = {b"heic": "a HEIC file", b"heix": "a HEIC file", b"heim": "a HEIC file", b"heis": "a HEIC file",
                b"mif1": "a HEIF file", b"msf1": "a HEIF file", b"avif": "an AVIF file", b"avis": "an AVIF file"}
# Pillow's own bomb limit is a warning up to 2x; make anything above it an error instead.
# The default of `load_image(max_pixels=...)`: a caller with less memory to spare passes less.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Bumped whenever the pixels load_image returns change (2: JPEGs decoded at reduced scale), so that
# cached features of the old pixels are not reused.
LOADER_VERSION = 2
# Modes `Image.reduce` cannot average (palette indices, bits, 16-bit), and what to_rgb would
# turn them into anyway.
_REDUCE_AS = {"1": "L", "P": "RGBA", "PA": "RGBA", "I;16": "I", "I;16B": "I", "I;16L": "I", "I;16N": "I"}
_OPEN_LOCK = threading.Lock()

# bytes: a file's contents already in memory (an upload), checked as the file would be.
ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


class ImageError(ValueError):
    """A photo that cannot be used; the message is one line: `<file>: <reason>`."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason


def describe_source(source: ImageSource) -> str:
    """A short name for messages and output rows."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    if isinstance(source, bytes):
        return "<bytes>"
    return "<array>" if isinstance(source, np.ndarray) else f"<{type(source).__name__}>"


def _check_file(path: Path) -> None:
    """Refuse what is not a non-empty regular file, before anything reads it."""
    name = str(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageError(name, "no such file" + (" (broken symlink)" if path.is_symlink() else "")) from None
    except PermissionError:  # e.g. inside a folder the user may not enter
        raise ImageError(name, "permission denied") from None
    except OSError as e:  # symlink loop, name too long, ...
        raise ImageError(name, f"cannot be read ({e.strerror or e})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(name, "is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):  # reading a FIFO or a device could block or never end
        raise ImageError(name, "not a regular file")
    if info.st_size == 0:
        raise ImageError(name, "empty file (0 bytes)")


def _open(source: Path | bytes, size: int | None, max_pixels: int) -> Image.Image:
    """A file, or a file's bytes already in memory (an upload), opened with the same checks."""
    name = describe_source(source)
    if isinstance(source, bytes):
        if not source:
            raise ImageError(name, "empty file (0 bytes)")
    else:
        _check_file(source)
    try:
        # catch_warnings swaps process-wide state, so threads loading photos at once must
        # take turns; only the header is read here, decoding below runs in parallel.
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused just below
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=ALLOWED_FORMATS)
        _check_pixels(image, name, max_pixels)  # before a single pixel is decoded
        if size is not None and image.format in ("JPEG", "MPO"):
            # libjpeg can decode at 1/2, 1/4 or 1/8 scale, for a fraction of the time and memory
            # (a 12 MP photo: 48 MB -> 0.75 MB). draft picks the smallest scale that keeps both
            # sides >= size, so the final squash never enlarges; pixels differ from a full decode
            # followed by the resize by about 1 level in 255 on average (tests/test_images.py).
            image.draft("RGB", (size, size))
        image.load()
        return image
    except ImageError:
        raise
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except Image.DecompressionBombError:  # over twice Pillow's limit: it refuses before we see the size
        raise ImageError(name, f"image too large (over {min(max_pixels, 2 * MAX_PIXELS):,} pixels)") from None
    except MemoryError:
        raise ImageError(name, "not enough memory to decode it") from None
    except UnidentifiedImageError:
        raise ImageError(name, _unsupported(source[:16] if isinstance(source, bytes) else _head(source))) from None
    except Exception as e:  # noqa: BLE001 - corrupt data makes Pillow's decoders raise almost anything
        raise ImageError(name, f"corrupt or truncated image ({_reason(e)})") from None


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(16)
    except OSError:
        return b""


def _unsupported(head: bytes) -> str:
    """Why no allowed plugin took the file, from its first bytes (which only we read)."""
    for fmt in ALLOWED_FORMATS:  # a supported format's signature, but a header its plugin rejected
        accept = Image.OPEN.get(fmt, (None, None))[1]
        if accept is not None and accept(head) is True:
            return f"corrupt or truncated image (unreadable {'WebP' if fmt == 'WEBP' else fmt} header)"
    kind = next((kind for magic, kind in _REFUSED_MAGIC if head.startswith(magic)), None)
    if kind is None and head[4:8] == b"ftyp":  # ISO media file: HEIC, AVIF (or a video)
        kind = _HEIF_BRANDS.get(head[8:12])
    reason = f"not an image in a supported format ({_SUPPORTED})"
    return f"{kind}, {reason}" if kind else reason


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())  # one line, whatever the decoder said
    return text or type(error).__name__


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    if image.width == 0 or image.height == 0:
        raise ImageError(name, "image has no pixels")
    if image.width * image.height > max_pixels:
        raise ImageError(name, f"image too large ({image.width}x{image.height}, over {max_pixels:,} pixels)")


def _upright(image: Image.Image, name: str, max_pixels: int) -> Image.Image:
    """The first frame, turned as its EXIF orientation says; refuses an oversized image first."""
    _check_pixels(image, name, max_pixels)
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated GIF/WebP: caption the first frame
    try:
        # Only when rotated: exif_transpose copies even an upright image.
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose an otherwise good photo
        pass
    return image


def _shrink(image: Image.Image, size: int) -> tuple[Image.Image, tuple[float, float, float, float] | None]:
    """Average blocks of pixels away while both sides stay >= 3 * size, so the mode conversions
    copy a small image; also returns the box the final resize must read.

    These are the factors `resize(..., reducing_gap=3.0)` reduces by itself, and with the box
    (which leaves out the padding of a partial last block) the result is the same as resizing
    the full image.
    """
    factor = (max(image.width // (3 * size), 1), max(image.height // (3 * size), 1))
    if factor == (1, 1):
        return image, None
    box = (0.0, 0.0, image.width / factor[0], image.height / factor[1])
    try:
        if image.mode in _REDUCE_AS:  # (convert copies even to the same mode)
            image = image.convert(_REDUCE_AS[image.mode])
        return image.reduce(factor), box
    except ValueError:  # a rare decoder mode reduce cannot average: convert it at full size
        return image, None


def _rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: palette, alpha (on white), 16-bit, 32-bit, float, CMYK."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit, 32-bit and float: stretch to 8 bits
        a = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(a / max(a.max(), 1.0) * 255.0, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        image = background
    return image.convert("RGB")


def to_rgb(image: Image.Image, name: str = "<PIL image>", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Upright 8-bit RGB from any mode: EXIF rotation, palette, alpha (on white), 16-bit, CMYK."""
    return _rgb(_upright(image, name, max_pixels))


def load_image(source: ImageSource, size: int | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Return an upright uint8 RGB array, squashed to `size` x `size` when given.

    A photo of more than `max_pixels` is refused (a file: from its header, before decoding).
    With `size`, JPEGs are decoded at reduced scale and other images averaged down early, so
    memory follows `size` more than the photo. Raises `ImageError` ("<file>: <reason>") for
    anything that is not a usable photo.
    """
    name = describe_source(source)
    if isinstance(source, np.ndarray):
        image = _array_to_image(source, name)
    elif isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, os.PathLike, bytes)):
        image = _open(source if isinstance(source, bytes) else Path(source), size, max_pixels)
    else:
        raise ImageError(name, f"unsupported source type {type(source).__name__} "
                         "(give a path, a file's bytes, a PIL image or an array)")
    try:
        image = _upright(image, name, max_pixels)
        box = None
        if size is not None:
            image, box = _shrink(image, size)  # before the conversions, which copy the image
        image = _rgb(image)
        if size is not None and image.size != (size, size):
            # Squash rather than crop: Flickr8k training copies are squashed, and a crop
            # could cut off what the caption should mention.
            image = image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
        return np.asarray(image, dtype=np.uint8)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a corrupt later frame or EXIF block of an opened file
        raise ImageError(name, f"corrupt or truncated image ({_reason(e)})") from None


def _array_to_image(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise ImageError(name, f"expected an HxWx3 array, got shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def iter_image_files(paths: Iterable[str | os.PathLike], recursive: bool = False) -> Iterator[Path]:
    """Expand files and folders into image paths, in a stable sorted order.

    Files named explicitly are yielded whatever their suffix (so a broken one is reported);
    inside folders only image suffixes are picked up. Missing paths raise FileNotFoundError.
    """
    for p in map(Path, paths):
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            yield from sorted(f for f in p.glob(pattern) if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists() or p.is_symlink():
            yield p
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
