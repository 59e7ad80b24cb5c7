"""Which file formats reach Pillow (security review, item 1): only an allow-list, whatever the name.

Pillow identifies ~40 formats by content. Some plugins do more than parse: EPS hands the file to
Ghostscript, which runs the PostScript in it. A file is therefore only ever offered to the plugins
of `ALLOWED_FORMATS`; anything else is refused with a one-line reason, named from its magic bytes
where we know them, without the other format's plugin seeing it.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from captioner.images import ALLOWED_FORMATS, IMAGE_SUFFIXES, ImageError, load_image

SUPPORTED = "not an image in a supported format (JPEG, PNG, WebP, BMP, GIF or TIFF)"
PHOTO = np.random.default_rng(5).integers(0, 256, (24, 32, 3), dtype=np.uint8)
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 24\n%%EndComments\nnewpath 0 0 moveto 32 24 lineto stroke\nshowpage\n%%EOF\n"


def encoded(fmt: str, image: Image.Image | None = None, **kwargs) -> bytes:
    buffer = io.BytesIO()
    (image or Image.fromarray(PHOTO)).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def foreign_plugins_called(monkeypatch) -> list[str]:
    """Every Pillow opener outside the allow-list, replaced by one that records being asked."""
    Image.init()
    called: list[str] = []
    for fmt, (factory, accept) in list(Image.OPEN.items()):
        if fmt not in ALLOWED_FORMATS:
            def spy(fp, filename, fmt=fmt, factory=factory):
                called.append(fmt)
                return factory(fp, filename)
            monkeypatch.setitem(Image.OPEN, fmt, (spy, accept))
    return called


def test_eps_named_jpg_never_reaches_the_eps_plugin(tmp_path, monkeypatch):
    # On a machine with Ghostscript, Pillow's EPS plugin runs the file's PostScript when it loads.
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(self) or 1 / 0)
    path = tmp_path / "photo.jpg"
    path.write_bytes(EPS)
    with pytest.raises(ImageError) as info:
        load_image(path, size=32)
    assert str(info.value) == f"{path}: an EPS/PostScript file, {SUPPORTED}"
    assert opened == []


def test_pillow_is_asked_only_for_the_allowed_formats(tmp_path, monkeypatch):
    seen = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, mode="r", formats=None: seen.append(formats) or real_open(fp, mode, formats))
    path = tmp_path / "photo.png"
    path.write_bytes(encoded("PNG"))
    load_image(path)
    assert seen == [ALLOWED_FORMATS]


# Formats Pillow can write but we refuse, and how the refusal names them (None: not named).
FOREIGN = {"EPS": "an EPS/PostScript file", "PDF": "a PDF file", "ICO": "an icon (ICO) file",
           "ICNS": "a macOS icon (ICNS) file", "JPEG2000": "a JPEG 2000 file", "AVIF": "an AVIF file",
           "PPM": None, "TGA": None, "PCX": None, "SGI": None, "QOI": None, "DDS": None, "IM": None,
           "SPIDER": None, "DIB": None}


@pytest.mark.parametrize("fmt", sorted(FOREIGN))
def test_other_formats_pillow_knows_are_refused_unopened(tmp_path, foreign_plugins_called, fmt):
    try:
        data = encoded(fmt)
    except (OSError, KeyError, ValueError) as e:  # a codec this Pillow was built without
        pytest.skip(f"this Pillow cannot write {fmt}: {e}")
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    with pytest.raises(ImageError) as info:
        load_image(path)
    named = FOREIGN[fmt]
    assert info.value.reason == (f"{named}, {SUPPORTED}" if named else SUPPORTED)
    assert foreign_plugins_called == []


@pytest.mark.parametrize("head, named", [
    (b"\xc5\xd0\xd3\xc6" + b"\0" * 28, "an EPS/PostScript file"),  # DOS EPS binary header
    (b"8BPS\0\1" + b"\0" * 26, "a Photoshop (PSD) file"),
    (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 8, "a HEIC file"),  # an iPhone photo
    (b"\0\0\0\x0cJXL \r\n\x87\n" + b"\0" * 20, "a JPEG XL file"),
    (b"remember to buy milk\n", None),
])
def test_refusals_name_the_format_from_its_magic_bytes(tmp_path, foreign_plugins_called, head, named):
    path = tmp_path / "photo.jpg"
    path.write_bytes(head)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.reason == (f"{named}, {SUPPORTED}" if named else SUPPORTED)
    assert foreign_plugins_called == []


@pytest.mark.parametrize("data, fmt", [(b"\xff\xd8\xff\xe0" + b"\0" * 30, "JPEG"),
                                       (b"\x89PNG\r\n\x1a\n" + b"\0" * 30, "PNG"),
                                       (b"RIFF\0\0\0\0WEBPVP8 " + b"\0" * 8, "WebP")])
def test_a_supported_format_with_a_broken_header_is_called_corrupt(tmp_path, data, fmt):
    # not "not an image in a supported format": the user would answer "but it is a JPEG"
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.reason.startswith("corrupt or truncated image (")
    if fmt != "WebP":  # libwebp words its own complaint
        assert info.value.reason == f"corrupt or truncated image (unreadable {fmt} header)"


SUFFIX_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF",
                 ".tif": "TIFF", ".tiff": "TIFF"}


@pytest.mark.parametrize("suffix", sorted(IMAGE_SUFFIXES))
def test_every_image_suffix_still_loads(tmp_path, foreign_plugins_called, suffix):
    fmt = SUFFIX_FORMAT[suffix]
    path = tmp_path / f"photo{suffix}"
    path.write_bytes(encoded(fmt, **({"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {})))
    out = load_image(path)
    assert foreign_plugins_called == []
    assert out.shape == PHOTO.shape and Image.open(path, formats=[fmt]).format == fmt
    if fmt not in ("JPEG", "GIF"):  # lossless
        np.testing.assert_array_equal(out, PHOTO)


def test_phone_jpeg_with_preview_frames_mpo_loads(tmp_path, foreign_plugins_called):
    first, preview = Image.fromarray(PHOTO), Image.new("RGB", (8, 6), (0, 0, 255))
    path = tmp_path / "IMG_0001.JPG"
    first.save(path, "MPO", save_all=True, append_images=[preview], quality=95)
    plain = tmp_path / "plain.jpg"
    first.save(plain, "JPEG", quality=95)
    assert load_image(path, size=16).shape == (16, 16, 3)
    np.testing.assert_array_equal(load_image(path), load_image(plain))  # the main picture, not the preview
    assert foreign_plugins_called == []
    assert Image.open(path, formats=["JPEG"]).format == "MPO"  # what Pillow calls it


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_animated_files_of_allowed_formats_give_the_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (6, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / f"a.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    assert Image.open(path).n_frames == 2
    assert (load_image(path) == [255, 0, 0]).all()
