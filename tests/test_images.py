"""Unit tests of captioner/images.py: every input becomes an upright uint8 RGB array or an ImageError."""
import io

import numpy as np
import pytest
from PIL import Image

from captioner.images import IMAGE_SUFFIXES, ImageError, describe_source, iter_image_files, load_image, to_rgb

RNG = np.random.default_rng(0)
PHOTO = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)  # not square: a rotation changes the shape


def saved(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_error_message_is_file_and_reason_on_one_line():
    e = ImageError("photos/a.jpg", "empty file (0 bytes)")
    assert str(e) == "photos/a.jpg: empty file (0 bytes)"
    assert (e.source, e.reason) == ("photos/a.jpg", "empty file (0 bytes)")
    assert isinstance(e, ValueError)  # the CLI reports every ValueError as one line


def test_describe_source(tmp_path):
    assert describe_source(tmp_path / "a.jpg") == str(tmp_path / "a.jpg")
    assert describe_source(PHOTO) == "<array>"
    assert describe_source(Image.fromarray(PHOTO)) == "<PIL image>"
    path = saved(Image.fromarray(PHOTO), tmp_path / "b.png")
    assert describe_source(Image.open(path)) == str(path)


@pytest.mark.parametrize("kind", ["path", "pil", "array"])
def test_sources_give_the_same_pixels(tmp_path, kind):
    path = saved(Image.fromarray(PHOTO), tmp_path / "p.png")
    source = {"path": path, "pil": Image.fromarray(PHOTO), "array": PHOTO}[kind]
    out = load_image(source)
    assert out.dtype == np.uint8 and out.shape == PHOTO.shape
    np.testing.assert_array_equal(out, PHOTO)


def test_size_squashes_without_cropping():
    left_red = np.zeros((10, 40, 3), np.uint8)
    left_red[:, :20] = (255, 0, 0)
    out = load_image(left_red, size=16)
    assert out.shape == (16, 16, 3)
    # squashed, not centre-cropped: the red half is still the left half
    assert out[:, :6, 0].min() > 200 and out[:, 10:, 0].max() < 50


def test_arrays_of_other_shapes_and_types():
    gray = np.full((4, 5), 7, np.uint8)
    np.testing.assert_array_equal(load_image(gray), np.full((4, 5, 3), 7, np.uint8))
    np.testing.assert_array_equal(load_image(gray[..., None]), np.full((4, 5, 3), 7, np.uint8))
    rgba = np.zeros((2, 2, 4), np.uint8)  # fully transparent black -> white background
    np.testing.assert_array_equal(load_image(rgba), np.full((2, 2, 3), 255, np.uint8))
    floats = np.array([[[-5.0, 100.4, 300.0]]])
    np.testing.assert_array_equal(load_image(floats), [[[0, 100, 255]]])


@pytest.mark.parametrize("shape", [(3,), (2, 2, 2), (2, 2, 5), (0, 4, 3), (1, 2, 3, 3)])
def test_bad_array_shapes(shape):
    with pytest.raises(ImageError, match=r"^<array>: expected an HxWx3 array"):
        load_image(np.zeros(shape, np.uint8))


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)     # opaque red
    rgba[0, 1] = (255, 0, 0, 0)       # invisible red
    rgba[1, 0] = (0, 0, 0, 128)       # half-transparent black
    out = load_image(saved(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert 120 <= out[1, 0, 0] <= 135
    la = Image.fromarray(np.dstack([np.full((2, 2), 10, np.uint8), np.full((2, 2), 255, np.uint8)]), "LA")
    assert load_image(la).tolist() == [[[10] * 3] * 2] * 2


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    out = load_image(saved(image, tmp_path / "p.gif", transparency=0))
    assert out[0, 0].tolist() == [255, 255, 255]  # transparent index -> white
    assert out[1, 1].tolist() == [0, 200, 0]


def test_grayscale_and_1bit(tmp_path):
    gray = load_image(saved(Image.fromarray(PHOTO).convert("L"), tmp_path / "g.png"))
    assert gray.shape == PHOTO.shape and (gray[..., 0] == gray[..., 2]).all()
    bits = load_image(Image.new("1", (3, 3), 1))
    assert (bits == 255).all()


def test_cmyk_keeps_colours(tmp_path):
    red = Image.new("RGB", (8, 8), (230, 20, 20)).convert("CMYK")
    out = load_image(saved(red, tmp_path / "c.jpg", quality=95))
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r > 180 and g < 70 and b < 70


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_deep_images_are_stretched_not_clipped(mode):
    ramp = np.linspace(0, {"I;16": 65535, "I": 1 << 20, "F": 1.0}[mode], 12).reshape(3, 4)
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = Image.fromarray(ramp.astype(dtype))
    assert image.mode == mode
    out = load_image(image)[..., 0]
    # a naive 8-bit conversion clips everything to white (or, for floats, to black)
    assert out.min() == 0 and out.max() == 255
    assert (np.diff(out.ravel().astype(int)) >= 0).all() and len(np.unique(out)) == 12


def test_16bit_png_from_disk(tmp_path):
    deep = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000)
    out = load_image(saved(Image.fromarray(deep), tmp_path / "d.png"))
    assert out.shape == (4, 5, 3) and out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


# EXIF orientation -> how the stored pixels relate to the upright picture (EXIF 2.3, tag 0x0112).
STORED = {
    1: lambda up: up,
    2: lambda up: up[:, ::-1],                  # mirrored
    3: lambda up: np.rot90(up, 2),
    4: lambda up: up[::-1],
    5: lambda up: up.transpose(1, 0, 2),
    6: lambda up: np.rot90(up, 1),              # phone held upright: viewer turns it clockwise
    7: lambda up: np.rot90(up, 2).transpose(1, 0, 2),
    8: lambda up: np.rot90(up, -1),
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_gives_the_upright_picture(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(STORED[orientation](PHOTO))
    path = saved(Image.fromarray(stored), tmp_path / "r.png", exif=exif)
    np.testing.assert_array_equal(load_image(path), PHOTO)
    np.testing.assert_array_equal(load_image(Image.open(path)), PHOTO)


def test_exif_rotated_jpeg_like_a_phone(tmp_path):
    upright = np.zeros((40, 24, 3), np.uint8)
    upright[:10] = (255, 255, 255)  # sky at the top
    exif = Image.Exif()
    exif[0x0112] = 6
    path = saved(Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))), tmp_path / "phone.jpg",
                 exif=exif, quality=95)
    out = load_image(path)
    assert out.shape == upright.shape
    assert np.abs(out.astype(int) - upright).mean() < 3


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")
def test_broken_exif_does_not_lose_the_photo(tmp_path):
    path = saved(Image.fromarray(PHOTO), tmp_path / "e.jpg", exif=b"Exif\x00\x00MM\x00*garbage", quality=95)
    assert load_image(path).shape == PHOTO.shape


def test_animated_gif_gives_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 4), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    out = load_image(path)
    assert out.shape == (4, 6, 3) and (out == [255, 0, 0]).all()
    opened = Image.open(path)
    opened.seek(2)  # a caller's PIL image left on a later frame
    assert (load_image(opened) == [255, 0, 0]).all()


def test_one_pixel(tmp_path):
    out = load_image(saved(Image.new("RGB", (1, 1), (1, 2, 3)), tmp_path / "1.png"), size=8)
    assert out.shape == (8, 8, 3) and (out == [1, 2, 3]).all()


def test_in_memory_images_are_size_checked():
    class Huge:  # stands in for a lazily opened 20000x20000 PIL image; no pixels exist
        width = height = 20000
    with pytest.raises(ImageError, match="too large"):
        to_rgb(Huge(), "huge.png")
    with pytest.raises(ImageError, match="no pixels"):
        to_rgb(Image.new("RGB", (0, 0)), "empty.png")


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("zero.jpg", lambda p: p.write_bytes(b""), "empty file"),
        ("text.jpg", lambda p: p.write_text("not a photo\n"), "not a supported image format"),
        ("dir.jpg", lambda p: p.mkdir(), "is a directory"),
        ("missing.jpg", lambda p: None, "no such file"),
        ("trunc.png", lambda p: p.write_bytes(_png_bytes()[:60]), "corrupt or truncated"),
    ],
)
def test_unusable_files(tmp_path, name, make, reason):
    path = tmp_path / name
    make(path)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: ") and reason in info.value.reason
    assert "\n" not in str(info.value)


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(PHOTO).save(buffer, "PNG")
    return buffer.getvalue()


def test_iter_image_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.JPG", "a.png", "notes.txt", "c.webp", "sub/d.jpeg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    flat = [p.name for p in iter_image_files([tmp_path])]
    assert flat == ["a.png", "b.JPG", "broken.jpg", "c.webp"]  # sorted, by suffix, broken link kept
    deep = [p.relative_to(tmp_path).as_posix() for p in iter_image_files([tmp_path], recursive=True)]
    assert "sub/d.jpeg" in deep and "notes.txt" not in deep
    # a file named explicitly is yielded whatever its suffix, so a wrong file gets reported
    assert list(iter_image_files([tmp_path / "notes.txt"])) == [tmp_path / "notes.txt"]
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        list(iter_image_files([tmp_path / "nope.jpg"]))
    assert {".jpg", ".jpeg", ".png"} <= IMAGE_SUFFIXES


@pytest.mark.parametrize("source", [b"\x89PNG...", io.BytesIO(b"x"), 42, None])
def test_unsupported_source_types(source):
    with pytest.raises(ImageError, match=f"^<{type(source).__name__}>: unsupported source type"):
        load_image(source)
