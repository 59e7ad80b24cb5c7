"""Unit tests of captioner/images.py: every input becomes an upright uint8 RGB array or an ImageError."""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from captioner.images import (
    IMAGE_SUFFIXES, MAX_PIXELS, ImageError, describe_source, iter_image_files, load_image, to_rgb,
)

RNG = np.random.default_rng(0)
PHOTO = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)  # not square: a rotation changes the shape
EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "examples"


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
        ("text.jpg", lambda p: p.write_text("not a photo\n"), "not an image in a supported format"),
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
    if path.is_file():  # the same bytes in memory (an upload) are refused for the same reason
        with pytest.raises(ImageError) as in_memory:
            load_image(path.read_bytes())
        assert (in_memory.value.source, in_memory.value.reason) == ("<bytes>", info.value.reason)


def test_a_files_bytes_load_as_the_file_does(tmp_path):
    path = saved(Image.fromarray(RNG.integers(0, 256, (300, 400, 3), dtype=np.uint8)), tmp_path / "a.jpg")
    np.testing.assert_array_equal(load_image(path.read_bytes(), 64), load_image(path, 64))
    with pytest.raises(ImageError, match="^<bytes>: image too large"):
        load_image(path.read_bytes(), 64, max_pixels=1000)
    with pytest.raises(ImageError, match="^<bytes>: a PDF file, not an image"):
        load_image(b"%PDF-1.4 ...")


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


@pytest.mark.parametrize("source", [bytearray(b"\x89PNG..."), io.BytesIO(b"x"), 42, None])
def test_unsupported_source_types(source):
    with pytest.raises(ImageError, match=f"^<{type(source).__name__}>: unsupported source type"):
        load_image(source)


# --- memory follows the encoder's size, not the photo's (security review, item 7) ---

def full_decode(path) -> np.ndarray:
    """The photo decoded at full size, as the loader did before it decoded JPEGs at reduced scale."""
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def jpeg_decodes(monkeypatch) -> list[tuple[int, int]]:
    """The size each JPEG is decoded at (after any draft)."""
    sizes: list[tuple[int, int]] = []
    real_load = JpegImagePlugin.JpegImageFile.load

    def load(self):
        if self.tile:  # not yet decoded
            sizes.append(self.size)
        return real_load(self)
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", load)
    return sizes


def test_a_12_megapixel_jpeg_is_decoded_at_an_eighth(tmp_path, jpeg_decodes):
    path = tmp_path / "phone.jpg"
    Image.open(EXAMPLES / "astronaut.jpg").resize((4000, 3000), Image.Resampling.BICUBIC).save(path, quality=90)
    before = load_image(full_decode(path), 224)
    jpeg_decodes.clear()
    out = load_image(path, 224)
    assert jpeg_decodes == [(500, 375)]  # 1/8 scale, 0.2 MP instead of 12 MP; both sides still >= 224
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - before).mean() < 3  # measured 0.4 (of 255)


@pytest.mark.parametrize("shape, size, decoded", [
    ((1000, 300), 224, (1000, 300)),   # the short side is already near size: no scaling
    ((2000, 1000), 224, (500, 250)),   # 1/4: 1/8 would leave 125 < 224 rows
    ((900, 900), 224, (225, 225)),     # 1/4, with one row to spare
    ((600, 500), 224, (300, 250)),     # 1/2
    ((4000, 3000), 299, (500, 375)),   # another encoder's size
])
def test_draft_never_leaves_a_side_below_size(tmp_path, jpeg_decodes, shape, size, decoded):
    path = saved(Image.new("RGB", shape, (30, 140, 60)), tmp_path / "a.jpg")
    out = load_image(path, size)
    assert jpeg_decodes == [decoded] and out.shape == (size, size, 3)
    assert np.abs(out.astype(int) - (30, 140, 60)).max() <= 3


def test_a_normal_photo_barely_changes(jpeg_decodes):
    # The shipped example is 500x500: at 224 it is now decoded at half size. The squashed
    # result differs from a full decode by ~1 level in 255 on average (DCT scaling is a
    # slightly different low-pass than Pillow's bicubic reduction).
    path = EXAMPLES / "astronaut.jpg"
    before = load_image(full_decode(path), 224).astype(int)
    jpeg_decodes.clear()
    out = load_image(path, 224).astype(int)
    assert jpeg_decodes == [(250, 250)]
    assert np.abs(out - before).mean() < 3  # measured 1.23
    np.testing.assert_array_equal(load_image(path), full_decode(path))  # no size: full resolution


def test_no_size_means_no_reduced_decoding(tmp_path, jpeg_decodes):
    path = saved(Image.new("RGB", (2000, 1000)), tmp_path / "a.jpg")
    assert load_image(path).shape == (1000, 2000, 3) and jpeg_decodes == [(2000, 1000)]


def test_exif_rotated_big_jpeg_is_upright_after_reduced_decoding(tmp_path):
    upright = np.zeros((1600, 1200, 3), np.uint8)
    upright[:400] = (255, 255, 255)  # sky at the top
    exif = Image.Exif()
    exif[0x0112] = 6
    path = saved(Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))), tmp_path / "phone.jpg",
                 exif=exif, quality=95)
    out = load_image(path, 64).astype(int)
    assert out[:12].min() > 240 and out[20:].max() < 15  # top quarter white, the rest black


@pytest.mark.parametrize("shape", [(2001, 1499), (1499, 2001), (1800, 1200)])
def test_big_lossless_images_are_averaged_down_early_with_the_same_result(tmp_path, shape):
    # PNG has no reduced decoding, but averaging blocks before the mode conversions keeps their
    # copies small; the factors and box are those the final resize used, so no pixel moves.
    photo = Image.open(EXAMPLES / "astronaut.jpg").resize(shape, Image.Resampling.BICUBIC)
    path = saved(photo, tmp_path / "big.png", compress_level=1)
    old_way = np.asarray(photo.resize((100, 100), Image.Resampling.BICUBIC, reducing_gap=3.0))
    np.testing.assert_array_equal(load_image(path, 100), old_way)


def test_early_averaging_keeps_alpha_palette_and_16_bit_right(tmp_path):
    rgba = np.zeros((1200, 1000, 4), np.uint8)
    rgba[:, :500] = (255, 0, 0, 255)  # opaque red left, transparent right -> white
    out = load_image(saved(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"), 32).astype(int)
    assert (np.abs(out[:, :14] - (255, 0, 0)) <= 2).all() and (out[:, 18:] >= 253).all()
    palette = Image.fromarray(rgba[..., 0] // 255, "P")
    palette.putpalette([0, 0, 255, 0, 200, 0] + [0] * 762)
    out = load_image(saved(palette, tmp_path / "p.png", transparency=0), 32).astype(int)
    assert (np.abs(out[:, :14] - (0, 200, 0)) <= 2).all() and (out[:, 18:] >= 253).all()
    deep = np.tile(np.linspace(0, 60000, 1000).astype(np.uint16), (1200, 1))  # dark left, bright right
    out = load_image(saved(Image.fromarray(deep), tmp_path / "d.png"), 32)[..., 0].astype(int)
    assert out[:, 0].max() < 10 and out[:, -1].min() > 245 and (np.diff(out[0]) >= 0).all()
    rotated = Image.Exif()
    rotated[0x0112] = 8
    tall = np.zeros((1200, 1000, 3), np.uint8)
    tall[:300] = 255  # sky at the top
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(tall, -1)))
    out = load_image(saved(stored, tmp_path / "r.tif", exif=rotated), 32).astype(int)
    assert out[:7].min() > 245 and out[10:].max() < 10


def test_max_pixels_is_the_callers_budget(tmp_path, monkeypatch):
    path = saved(Image.new("RGB", (400, 300), (9, 9, 9)), tmp_path / "big.jpg")
    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded an image over the budget"))
        with pytest.raises(ImageError) as info:
            load_image(path, 224, max_pixels=100_000)
    assert str(info.value) == f"{path}: image too large (400x300, over 100,000 pixels)"
    assert load_image(path, 224, max_pixels=120_000).shape == (224, 224, 3)
    for source in (Image.new("RGB", (400, 300)), np.zeros((300, 400, 3), np.uint8)):
        with pytest.raises(ImageError, match=r"image too large \(400x300, over 100,000 pixels\)$"):
            load_image(source, max_pixels=100_000)
    assert MAX_PIXELS == Image.MAX_IMAGE_PIXELS  # the default budget: Pillow's warning limit
