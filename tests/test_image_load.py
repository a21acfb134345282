"""Tests for the safe image loader (:mod:`hires_lmm.image.load`).

Every fixture is drawn here with PIL/numpy into pytest's ``tmp_path``; nothing is downloaded and no
binary file is committed.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from hires_lmm.image import load as load_mod
from hires_lmm.image.load import (
    DEFAULT_MAX_PIXELS,
    EmptyImageError,
    ImageLoadError,
    ImageNotFoundError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    decode_data_url,
    image_size,
    load_image,
    to_rgb,
)

WHITE = (255, 255, 255)
RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# helpers


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def assert_rgb8(img: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """The loader's contract: a PIL image in mode RGB with 8-bit channels."""
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    a = np.asarray(img)
    assert a.dtype == np.uint8
    assert a.ndim == 3 and a.shape[2] == 3
    if size is not None:
        assert img.size == size
    return a


def assert_close(actual, expected, tol: int = 0) -> None:
    actual, expected = tuple(actual), tuple(expected)
    assert len(actual) == len(expected), (actual, expected)
    assert all(abs(int(a) - int(e)) <= tol for a, e in zip(actual, expected)), (actual, expected)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == PNG_SIGNATURE
    chunks, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return chunks


def build_png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    out = [PNG_SIGNATURE]
    for cid, body in chunks:
        out.append(struct.pack(">I", len(body)) + cid + body + struct.pack(">I", zlib.crc32(cid + body)))
    return b"".join(out)


def png_claiming_size(w: int, h: int) -> bytes:
    """A well-formed PNG whose IHDR claims ``w x h`` but whose data holds a single pixel: only a
    header read can succeed on it, so any decode would fail."""
    chunks = png_chunks(encode(Image.new("RGB", (1, 1), RED), "PNG"))
    assert chunks[0][0] == b"IHDR"
    chunks[0] = (b"IHDR", struct.pack(">II", w, h) + chunks[0][1][8:])
    return build_png(chunks)


@pytest.fixture
def forbid_decoding(monkeypatch):
    """Fail the test if any image's pixel data is decoded."""
    calls: list[tuple[int, int]] = []

    def no_load(self, *a, **k):
        calls.append(self.size)
        raise AssertionError(f"pixel data decoded for a {self.size} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    return calls


# ----------------------------------------------------------------------------------------------
# EXIF orientation

# A landscape picture, W x H as stored, with a red block in the stored top-left corner and a green
# block in the stored top-right corner (two adjacent corners pin down any rotation or mirroring).
W, H, B = 60, 30, 10
RED_AT, GREEN_AT = (B // 2, B // 2), (W - 1 - B // 2, B // 2)

# Where the stored pixel (x, y) must appear after the EXIF orientation is applied, and the
# displayed size. (TIFF/EXIF 2.3: 1 as stored, 2 mirrored, 3 rotated 180, 4 flipped, 5 transposed,
# 6 needs 90 degrees clockwise, 7 transversed, 8 needs 90 degrees counter-clockwise.)
ORIENTATIONS = {
    1: ((W, H), lambda x, y: (x, y)),
    2: ((W, H), lambda x, y: (W - 1 - x, y)),
    3: ((W, H), lambda x, y: (W - 1 - x, H - 1 - y)),
    4: ((W, H), lambda x, y: (x, H - 1 - y)),
    5: ((H, W), lambda x, y: (y, x)),
    6: ((H, W), lambda x, y: (H - 1 - y, x)),
    7: ((H, W), lambda x, y: (H - 1 - y, W - 1 - x)),
    8: ((H, W), lambda x, y: (y, W - 1 - x)),
}


def marked_picture() -> Image.Image:
    a = np.full((H, W, 3), 255, np.uint8)
    a[:B, :B] = RED
    a[:B, W - B:] = GREEN
    return Image.fromarray(a)


def exif_with_orientation(o: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = o
    return exif


def oriented_jpeg(tmp_path: Path, o: int) -> Path:
    path = tmp_path / f"orient{o}.jpg"
    marked_picture().save(path, "JPEG", quality=95, exif=exif_with_orientation(o))
    with Image.open(path) as check:  # the fixture really carries the tag, and is stored landscape
        assert check.getexif().get(0x0112) == o and check.size == (W, H)
    return path


def assert_markers(img: Image.Image, o: int, tol: int) -> None:
    size, where = ORIENTATIONS[o]
    assert img.size == size
    assert_close(img.getpixel(where(*RED_AT)), RED, tol)
    assert_close(img.getpixel(where(*GREEN_AT)), GREEN, tol)
    # and the stored position of the red block no longer holds red unless it maps onto itself
    if where(*RED_AT) != RED_AT and RED_AT[0] < size[0] and RED_AT[1] < size[1]:
        assert img.getpixel(RED_AT)[1] > 150  # white or green there, not red


@pytest.mark.parametrize("o", [6, 8, 3])
def test_exif_orientation_jpeg_rotated(tmp_path, o):
    img = load_image(oriented_jpeg(tmp_path, o))
    assert_rgb8(img)
    assert_markers(img, o, tol=40)


def test_exif_orientation_6_is_portrait_with_red_corner_top_right(tmp_path):
    img = load_image(oriented_jpeg(tmp_path, 6))
    assert img.size == (H, W)  # 30 wide, 60 high
    assert_close(img.getpixel((H - 1 - B // 2, B // 2)), RED, 40)  # top-right
    assert_close(img.getpixel((B // 2, B // 2)), WHITE, 40)  # top-left is background


@pytest.mark.parametrize("o", sorted(ORIENTATIONS))
def test_every_exif_orientation(tmp_path, o):
    assert_markers(load_image(oriented_jpeg(tmp_path, o)), o, tol=40)


@pytest.mark.parametrize("o", [6, 8, 3, 1, 5, 7])
def test_image_size_reports_oriented_size_without_decoding(tmp_path, forbid_decoding, o):
    path = oriented_jpeg(tmp_path, o)
    assert image_size(path) == ORIENTATIONS[o][0]
    assert image_size(str(path)) == ORIENTATIONS[o][0]
    assert forbid_decoding == []


@pytest.mark.parametrize("o", [3, 6, 8])
def test_image_size_matches_loaded_size(tmp_path, o):
    path = oriented_jpeg(tmp_path, o)
    assert image_size(path) == load_image(path).size == ORIENTATIONS[o][0]


@pytest.mark.parametrize("o", [6, 8])
def test_exif_orientation_png_before_image_data(tmp_path, forbid_decoding, o):
    data = encode(marked_picture(), "PNG", exif=exif_with_orientation(o))
    ids = [cid for cid, _ in png_chunks(data)]
    assert ids.index(b"eXIf") < ids.index(b"IDAT")
    assert image_size(data) == ORIENTATIONS[o][0]
    assert forbid_decoding == []


@pytest.mark.parametrize("o", [6, 8])
def test_exif_orientation_png_after_image_data(tmp_path, monkeypatch, o):
    """An eXIf chunk may follow IDAT; image_size finds it without decoding, and agrees with
    load_image (which is lossless here, so the markers are exact)."""
    chunks = png_chunks(encode(marked_picture(), "PNG", exif=exif_with_orientation(o)))
    exif = next(c for c in chunks if c[0] == b"eXIf")
    chunks.remove(exif)
    chunks.insert(len(chunks) - 1, exif)  # just before IEND
    ids = [cid for cid, _ in chunks]
    assert ids.index(b"eXIf") > ids.index(b"IDAT")
    path = write(tmp_path / "late_exif.png", build_png(chunks))

    img = load_image(path)
    assert_markers(img, o, tol=0)
    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", lambda self, *a, **k: pytest.fail("decoded"))
        assert image_size(path) == img.size == ORIENTATIONS[o][0]


def test_png_without_exif_is_not_decoded_by_image_size(tmp_path, forbid_decoding):
    path = tmp_path / "plain.png"
    Image.new("RGB", (37, 11), RED).save(path)
    assert image_size(path) == (37, 11)
    assert forbid_decoding == []


def test_orientation_applied_to_already_open_pil_image(tmp_path):
    with Image.open(oriented_jpeg(tmp_path, 8)) as src:
        assert image_size(src) == (H, W)
        assert_markers(load_image(src), 8, tol=40)


def test_broken_exif_does_not_make_image_unreadable(tmp_path):
    chunks = png_chunks(encode(Image.new("RGB", (5, 3), BLUE), "PNG"))
    chunks.insert(1, (b"eXIf", b"this is not a TIFF header at all"))
    data = build_png(chunks)
    assert image_size(data) == (5, 3)
    img = load_image(data)
    assert img.size == (5, 3) and img.getpixel((4, 2)) == BLUE


# ----------------------------------------------------------------------------------------------
# modes -> 8-bit RGB


def palette_image(transparent_index: int | None = None) -> Image.Image:
    img = Image.new("P", (4, 2))
    img.putpalette([10, 20, 30, 200, 100, 50, 0, 0, 255] + [0] * (256 - 3) * 3)
    img.putdata([0, 1, 2, 1, 0, 0, 1, 2])
    if transparent_index is not None:
        img.info["transparency"] = transparent_index
    return img


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP"])
def test_palette_without_transparency(tmp_path, fmt):
    path = tmp_path / f"p.{fmt.lower()}"
    palette_image().save(path, fmt)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" not in check.info
    a = assert_rgb8(load_image(path), (4, 2))
    assert tuple(a[0, 0]) == (10, 20, 30)
    assert tuple(a[0, 1]) == (200, 100, 50)
    assert tuple(a[0, 2]) == (0, 0, 255)
    # no background bleeds in where nothing is transparent, whatever the background
    assert tuple(np.asarray(load_image(path, background=(1, 2, 3)))[0, 0]) == (10, 20, 30)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(tmp_path, fmt):
    path = tmp_path / f"pt.{fmt.lower()}"
    palette_image(transparent_index=0).save(path, fmt, transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    a = assert_rgb8(load_image(path), (4, 2))
    assert tuple(a[0, 0]) == WHITE  # index 0 is transparent: the default background
    assert tuple(a[1, 0]) == WHITE
    assert tuple(a[0, 1]) == (200, 100, 50)  # opaque indices keep their palette colour
    b = np.asarray(load_image(path, background=(0, 128, 0)))
    assert tuple(b[0, 0]) == (0, 128, 0)
    assert tuple(b[0, 2]) == (0, 0, 255)


def test_palette_with_rgba_palette_alpha(tmp_path):
    """A PNG palette with per-entry alpha (tRNS holding several values)."""
    path = tmp_path / "prgba.png"
    img = palette_image()
    img.save(path, transparency=bytes([0, 128, 255]))
    a = np.asarray(load_image(path, background=(0, 0, 0)))
    assert tuple(a[0, 0]) == (0, 0, 0)  # alpha 0
    assert_close(a[0, 1], (100, 50, 25), 1)  # (200, 100, 50) at alpha 128 over black
    assert tuple(a[0, 2]) == (0, 0, 255)  # alpha 255


def test_la(tmp_path):
    path = tmp_path / "la.png"
    Image.fromarray(np.array([[[50, 0], [100, 255], [0, 128]]], np.uint8), "LA").save(path)
    with Image.open(path) as check:
        assert check.mode == "LA"
    a = assert_rgb8(load_image(path), (3, 1))
    assert tuple(a[0, 0]) == WHITE
    assert tuple(a[0, 1]) == (100, 100, 100)
    assert_close(a[0, 2], (127, 127, 127), 1)  # black at half alpha over white
    b = np.asarray(load_image(path, background=(10, 20, 30)))
    assert tuple(b[0, 0]) == (10, 20, 30)


RGBA_PIXELS = np.array([[[255, 0, 0, 0], [10, 20, 30, 255], [0, 0, 0, 128], [0, 0, 200, 128]]],
                       np.uint8)


@pytest.fixture
def rgba_png(tmp_path) -> Path:
    path = tmp_path / "rgba.png"
    Image.fromarray(RGBA_PIXELS, "RGBA").save(path)
    return path


def test_rgba_transparent_becomes_white_by_default(rgba_png):
    a = assert_rgb8(load_image(rgba_png), (4, 1))
    assert tuple(a[0, 0]) == WHITE  # fully transparent red is not red
    assert tuple(a[0, 1]) == (10, 20, 30)  # opaque unchanged
    assert_close(a[0, 2], (127, 127, 127), 1)  # half-transparent black over white is blended
    assert_close(a[0, 3], (127, 127, 227), 1)


def test_rgba_custom_background(rgba_png):
    a = np.asarray(load_image(rgba_png, background=(0, 128, 0)))
    assert tuple(a[0, 0]) == (0, 128, 0)
    assert tuple(a[0, 1]) == (10, 20, 30)
    assert_close(a[0, 2], (0, 64, 0), 1)
    b = np.asarray(load_image(rgba_png, background=(200, 0, 0)))
    assert_close(b[0, 3], (100, 0, 100), 1)  # (200,0,0)*0.5 + (0,0,200)*0.5


def test_rgba_pil_image_input_is_not_modified():
    src = Image.fromarray(RGBA_PIXELS, "RGBA")
    out = load_image(src)
    assert src.mode == "RGBA" and np.array_equal(np.asarray(src), RGBA_PIXELS)
    assert out is not src and tuple(np.asarray(out)[0, 0]) == WHITE


def test_to_rgb_directly():
    out = to_rgb(Image.fromarray(RGBA_PIXELS, "RGBA"), background=(9, 9, 9))
    assert_rgb8(out, (4, 1))
    assert out.getpixel((0, 0)) == (9, 9, 9)
    pa = palette_image().convert("PA")
    pa.putalpha(0)
    assert to_rgb(pa).getpixel((1, 0)) == WHITE
    assert_rgb8(to_rgb(pa))


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(tmp_path, fmt):
    path = tmp_path / f"cmyk.{fmt.lower()}"
    a = np.zeros((8, 24, 4), np.uint8)
    a[:, 8:16] = (0, 255, 255, 0)  # red
    a[:, 16:] = (0, 0, 0, 255)  # black
    Image.fromarray(a, "CMYK").save(path, fmt)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    tol = 12 if fmt == "JPEG" else 0
    out = load_image(path)
    assert_rgb8(out, (24, 8))
    assert_close(out.getpixel((3, 3)), WHITE, tol)
    assert_close(out.getpixel((11, 3)), RED, tol)
    assert_close(out.getpixel((20, 3)), (0, 0, 0), tol)


def test_i16_png_is_rescaled_not_clipped(tmp_path):
    path = tmp_path / "i16.png"
    Image.fromarray(np.array([[65535, 32768, 0, 257 * 100]], np.uint16)).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I;16")
    a = assert_rgb8(load_image(path), (4, 1))
    assert tuple(a[0, 0]) == WHITE
    assert a[0, 1, 0] in (127, 128)  # clipping would give 255
    assert tuple(a[0, 2]) == (0, 0, 0)
    assert tuple(a[0, 3]) == (100, 100, 100)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()  # still grey


def test_i16_tiff(tmp_path):
    path = tmp_path / "i16.tif"
    Image.fromarray(np.array([[65535, 32768, 0]], np.uint16)).save(path)
    a = assert_rgb8(load_image(path), (3, 1))
    assert list(a[0, :, 0]) in ([255, 128, 0], [255, 127, 0])


def test_mode_i_in_16_bit_range(tmp_path):
    path = tmp_path / "i.tif"
    Image.fromarray(np.array([[65535, 32768, 0]], np.int32)).save(path)
    with Image.open(path) as check:
        assert check.mode == "I"
    a = assert_rgb8(load_image(path), (3, 1))
    assert a[0, 0, 0] == 255 and a[0, 1, 0] in (127, 128) and a[0, 2, 0] == 0


def test_mode_i_outside_16_bit_range_uses_min_max(tmp_path):
    path = tmp_path / "iwide.tif"
    Image.fromarray(np.array([[-1000, 99000, 49000]], np.int32)).save(path)
    a = assert_rgb8(load_image(path), (3, 1))
    assert a[0, 0, 0] == 0 and a[0, 1, 0] == 255 and a[0, 2, 0] in (127, 128)


def test_mode_f_unit_range(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(path)
    with Image.open(path) as check:
        assert check.mode == "F"
    a = assert_rgb8(load_image(path), (3, 1))
    assert a[0, 0, 0] == 0 and a[0, 1, 0] in (127, 128) and a[0, 2, 0] == 255


def test_mode_f_byte_range_is_clipped_to_0_255():
    img = Image.fromarray(np.array([[-5.0, 100.0, 255.0, 300.0]], np.float32))
    a = assert_rgb8(load_image(img), (4, 1))
    assert list(a[0, :, 0]) == [0, 100, 255, 255]


def test_one_bit(tmp_path):
    path = tmp_path / "bw.png"
    img = Image.new("1", (4, 1), 0)
    img.putpixel((1, 0), 1)
    img.putpixel((3, 0), 1)
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == "1"
    a = assert_rgb8(load_image(path), (4, 1))
    assert [tuple(p) for p in a[0]] == [(0, 0, 0), WHITE, (0, 0, 0), WHITE]


def test_ycbcr(tmp_path):
    ycc = Image.new("YCbCr", (6, 4), (76, 85, 255))  # Y'CbCr of pure red
    path = tmp_path / "ycc.tif"
    ycc.save(path)
    with Image.open(path) as check:
        assert check.mode == "YCbCr"
    for src in (path, ycc):
        out = load_image(src)
        assert_rgb8(out, (6, 4))
        r, g, b = out.getpixel((2, 2))
        assert r > 230 and g < 30 and b < 30  # converted, not reinterpreted as (76, 85, 255)


def test_greyscale_l(tmp_path):
    path = tmp_path / "l.png"
    Image.fromarray(np.array([[0, 77, 255]], np.uint8)).save(path)
    a = assert_rgb8(load_image(path), (3, 1))
    assert [tuple(p) for p in a[0]] == [(0, 0, 0), (77, 77, 77), WHITE]


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr",
                                  "I", "I;16", "F", "HSV", "LAB"])
def test_every_mode_gives_rgb8(mode):
    img = Image.new(mode, (3, 2))
    assert_rgb8(to_rgb(img), (3, 2))
    assert_rgb8(load_image(img), (3, 2))


# ----------------------------------------------------------------------------------------------
# decompression bombs


def test_header_over_limit_raises_before_decoding(tmp_path, forbid_decoding):
    path = write(tmp_path / "bomb.png", png_claiming_size(5000, 5000))
    with pytest.raises(ImageTooLargeError) as ei:
        load_image(path, max_pixels=1_000_000)
    msg = str(ei.value)
    assert "5000x5000" in msg
    assert "1,000,000" in msg
    assert str(path) in msg
    assert isinstance(ei.value, ImageLoadError)
    assert forbid_decoding == []


def test_real_5000x5000_png_over_limit(tmp_path, forbid_decoding):
    path = tmp_path / "big.png"
    Image.new("L", (5000, 5000)).save(path)  # an in-memory image: saving never calls load
    with pytest.raises(ImageTooLargeError, match="5000x5000"):
        load_image(path, max_pixels=1_000_000)
    with pytest.raises(ImageTooLargeError, match="1,000,000"):
        image_size(path, max_pixels=1_000_000)
    assert forbid_decoding == []  # the check came from the header alone


def test_image_size_enforces_limit(tmp_path):
    path = write(tmp_path / "bomb.png", png_claiming_size(5000, 5000))
    with pytest.raises(ImageTooLargeError) as ei:
        image_size(path, max_pixels=1_000_000)
    assert "5000x5000" in str(ei.value) and "1,000,000" in str(ei.value)
    assert image_size(path, max_pixels=None) == (5000, 5000)
    assert image_size(path, max_pixels=25_000_000) == (5000, 5000)


def test_limit_on_bytes_stream_and_pil_image():
    data = png_claiming_size(3000, 2000)
    with pytest.raises(ImageTooLargeError, match="3000x2000"):
        load_image(data, max_pixels=1_000_000)
    with pytest.raises(ImageTooLargeError, match="3000x2000"):
        load_image(io.BytesIO(data), max_pixels=1_000_000)
    with pytest.raises(ImageTooLargeError):
        image_size(data, max_pixels=1_000_000)
    big = Image.new("L", (2000, 1000))
    with pytest.raises(ImageTooLargeError, match="2000x1000"):
        load_image(big, max_pixels=1_000_000)
    with pytest.raises(ImageTooLargeError):
        image_size(big, max_pixels=1_000_000)


def test_limit_is_inclusive():
    ok = encode(Image.new("L", (1000, 1000)), "PNG")
    assert load_image(ok, max_pixels=1_000_000).size == (1000, 1000)
    assert image_size(ok, max_pixels=1_000_000) == (1000, 1000)
    with pytest.raises(ImageTooLargeError):
        load_image(ok, max_pixels=999_999)


def test_limit_counts_oriented_images_the_same(tmp_path):
    path = oriented_jpeg(tmp_path, 6)  # 60x30 stored, 30x60 shown
    assert load_image(path, max_pixels=W * H).size == (H, W)
    with pytest.raises(ImageTooLargeError):
        image_size(path, max_pixels=W * H - 1)


def test_default_limit():
    assert DEFAULT_MAX_PIXELS == 64_000_000
    data = png_claiming_size(8001, 8000)
    with pytest.raises(ImageTooLargeError, match="64,000,000"):
        load_image(data)
    with pytest.raises(ImageTooLargeError):
        image_size(data)
    assert image_size(png_claiming_size(8000, 8000)) == (8000, 8000)


def test_max_pixels_none_disables_the_guard():
    data = png_claiming_size(5000, 5000)
    assert image_size(data, max_pixels=None) == (5000, 5000)
    # with the guard off, load_image goes on to decode and finds the data missing
    with pytest.raises(TruncatedImageError):
        load_image(data, max_pixels=None)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "GIF", "JPEG", "BMP", "WEBP"])
def test_our_limit_replaces_pils_global_one(monkeypatch, fmt):
    """PIL's own global limit (here far smaller than the image) neither blocks a load that our
    max_pixels allows (TIFF and GIF consult it again while decoding), nor gets changed."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = encode(Image.new("RGB", (80, 60), BLUE), fmt)
    for max_pixels in (None, 10_000):
        img = load_image(data, max_pixels=max_pixels)
        assert img.size == (80, 60)
        assert_close(img.getpixel((40, 30)), BLUE, 6)
        assert image_size(data, max_pixels=max_pixels) == (80, 60)
        assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(ImageTooLargeError):
        load_image(data, max_pixels=4799)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_pil_global_limit_unchanged_after_calls(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    assert before is not None
    good = encode(Image.new("RGB", (4, 4)), "PNG")
    load_image(good)
    load_image(good, max_pixels=None)
    image_size(good, max_pixels=None)
    for bad, kw in [(png_claiming_size(5000, 5000), {"max_pixels": 10}),
                    (png_claiming_size(5000, 5000), {"max_pixels": None}),
                    (b"not an image", {}),
                    (good[: len(good) // 2], {})]:
        with pytest.raises(ImageLoadError):
            load_image(bad, **kw)
        assert Image.MAX_IMAGE_PIXELS == before
    assert Image.MAX_IMAGE_PIXELS == before


def test_pil_global_limit_restored_under_threads():
    before = Image.MAX_IMAGE_PIXELS
    data = encode(Image.new("RGB", (64, 64), GREEN), "TIFF")
    errors: list[BaseException] = []

    def work():
        try:
            for i in range(10):
                assert load_image(data, max_pixels=None if i % 2 else 10_000).size == (64, 64)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert Image.MAX_IMAGE_PIXELS == before
    assert not load_mod._pil_lock.locked()


# ----------------------------------------------------------------------------------------------
# clear errors naming the file


def noise_picture(w: int = 96, h: int = 96) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("as_str", [False, True])
def test_missing_file(tmp_path, as_str):
    path = tmp_path / "nope" / "missing.png"
    src = str(path) if as_str else path
    for fn in (load_image, image_size):
        with pytest.raises(ImageNotFoundError) as ei:
            fn(src)
        assert isinstance(ei.value, FileNotFoundError)
        assert isinstance(ei.value, ImageLoadError) and isinstance(ei.value, ValueError)
        assert str(path) in str(ei.value)
        assert "no such file" in str(ei.value)


def test_directory(tmp_path):
    d = tmp_path / "adir.png"
    d.mkdir()
    for fn in (load_image, image_size):
        with pytest.raises(ImageLoadError) as ei:
            fn(d)
        assert not isinstance(ei.value, ImageNotFoundError)
        assert str(d) in str(ei.value) and "directory" in str(ei.value)


def test_empty_file(tmp_path):
    path = write(tmp_path / "empty.png", b"")
    for fn in (load_image, image_size):
        with pytest.raises(EmptyImageError) as ei:
            fn(path)
        assert str(path) in str(ei.value) and "empty" in str(ei.value)


@pytest.mark.parametrize("empty", [b"", bytearray()])
def test_empty_bytes(empty):
    with pytest.raises(EmptyImageError, match="no bytes"):
        load_image(empty)
    with pytest.raises(EmptyImageError):
        image_size(empty)


def test_text_file_renamed_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("Dear diary, today I saved a text file as a JPEG.\n" * 20)
    for fn in (load_image, image_size):
        with pytest.raises(NotAnImageError) as ei:
            fn(path)
        assert str(path) in str(ei.value)
        assert "not a recognised image" in str(ei.value)
    with pytest.raises(NotAnImageError, match="bytes"):
        load_image(b"hello world, plainly not an image")


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_file(tmp_path, fmt, suffix):
    data = encode(noise_picture(), fmt)
    path = write(tmp_path / f"cut.{suffix}", data[: len(data) // 2])
    assert image_size(path) == (96, 96)  # the header survives, so the size is still known
    with pytest.raises(TruncatedImageError) as ei:
        load_image(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert "truncated" in msg or "corrupt" in msg


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_bytes(fmt):
    data = encode(noise_picture(), fmt)
    with pytest.raises(TruncatedImageError, match="truncated|corrupt"):
        load_image(data[: len(data) // 2])


def test_truncated_inside_header(tmp_path):
    data = encode(noise_picture(), "PNG")
    path = write(tmp_path / "stub.png", data[:20])  # signature and part of IHDR
    with pytest.raises(ImageLoadError) as ei:
        load_image(path)
    assert isinstance(ei.value, (TruncatedImageError, NotAnImageError))
    assert str(path) in str(ei.value)


def test_garbage_after_png_signature(tmp_path):
    garbage = np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    path = write(tmp_path / "garbage.png", PNG_SIGNATURE + garbage)
    for fn in (load_image, image_size):
        with pytest.raises(ImageLoadError) as ei:
            fn(path)
        assert isinstance(ei.value, (NotAnImageError, TruncatedImageError))
        assert str(path) in str(ei.value)


def test_corrupt_compressed_data(tmp_path):
    """Chunk structure and CRCs intact, but the compressed pixel data is garbage."""
    chunks = png_chunks(encode(noise_picture(), "PNG"))
    chunks = [(cid, bytes(len(body)) if cid == b"IDAT" else body) for cid, body in chunks]
    path = write(tmp_path / "corrupt.png", build_png(chunks))
    assert image_size(path) == (96, 96)
    with pytest.raises(TruncatedImageError) as ei:
        load_image(path)
    assert str(path) in str(ei.value)


def test_error_classes_hierarchy():
    for cls in (ImageNotFoundError, EmptyImageError, NotAnImageError, TruncatedImageError,
                ImageTooLargeError):
        assert issubclass(cls, ImageLoadError)
    assert issubclass(ImageLoadError, ValueError)
    assert issubclass(ImageNotFoundError, FileNotFoundError)


# ----------------------------------------------------------------------------------------------
# inputs


@pytest.fixture
def quad_png(tmp_path) -> Path:
    """A lossless 4x3 picture whose every pixel is distinct."""
    a = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(3, 4, 3) * 7
    path = tmp_path / "quad.png"
    Image.fromarray(a).save(path)
    return path


def expected_quad() -> np.ndarray:
    return np.arange(4 * 3 * 3, dtype=np.uint8).reshape(3, 4, 3) * 7


def test_input_kinds(quad_png):
    data = quad_png.read_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    with open(quad_png, "rb") as fh, Image.open(quad_png) as opened:
        sources = {
            "str": str(quad_png),
            "Path": quad_png,
            "bytes": data,
            "bytearray": bytearray(data),
            "BytesIO": io.BytesIO(data),
            "file": fh,
            "PIL": opened,
            "data URL": url,
        }
        for name, src in sources.items():
            img = load_image(src)
            assert np.array_equal(assert_rgb8(img, (4, 3)), expected_quad()), name
        assert not fh.closed  # a caller's stream is left open
        assert opened.size == (4, 3) and opened.mode == "RGB"  # and a caller's image usable
        assert np.array_equal(np.asarray(opened), expected_quad())


def test_image_size_input_kinds(quad_png):
    data = quad_png.read_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    for src in (str(quad_png), quad_png, data, bytearray(data), io.BytesIO(data), url):
        assert image_size(src) == (4, 3)
    with Image.open(quad_png) as opened:
        assert image_size(opened) == (4, 3)


def test_loaded_image_is_independent_of_the_file(quad_png):
    img = load_image(quad_png)
    quad_png.unlink()  # the file handle was released and the pixels are in memory
    assert np.array_equal(np.asarray(img), expected_quad())


def test_caller_streams_stay_open_even_on_errors(quad_png):
    good = io.BytesIO(quad_png.read_bytes())
    assert image_size(good) == (4, 3)
    assert not good.closed
    load_image(good)
    assert not good.closed
    data = encode(noise_picture(), "PNG")
    cut = io.BytesIO(data[: len(data) // 2])
    with pytest.raises(TruncatedImageError, match="image stream"):
        load_image(cut)
    assert not cut.closed
    bomb = io.BytesIO(png_claiming_size(5000, 5000))
    with pytest.raises(ImageTooLargeError):
        image_size(bomb, max_pixels=10)
    assert not bomb.closed


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_file_handles_are_released(tmp_path, quad_png):
    data = encode(noise_picture(), "PNG")
    cut = write(tmp_path / "cut.png", data[: len(data) // 2])
    gif = tmp_path / "anim.gif"
    first, *rest = colour_frames()
    first.save(gif, save_all=True, append_images=rest)
    bomb = write(tmp_path / "bomb.png", png_claiming_size(5000, 5000))

    def open_fds() -> int:
        return len(list(Path("/proc/self/fd").iterdir()))

    before = open_fds()
    for _ in range(5):
        load_image(quad_png)
        load_image(gif)
        image_size(quad_png)
        image_size(gif)
        for bad, kw in ((cut, {}), (bomb, {"max_pixels": 10})):
            with pytest.raises(ImageLoadError):
                load_image(bad, **kw)
    assert open_fds() == before


def test_decode_data_url(quad_png):
    data = quad_png.read_bytes()
    assert decode_data_url("data:image/png;base64," + base64.b64encode(data).decode()) == data
    jpeg = encode(Image.new("RGB", (5, 7), RED), "JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    img = load_image(url)
    assert img.size == (5, 7)
    assert_close(img.getpixel((2, 3)), RED, 6)


@pytest.mark.parametrize("url,match", [
    ("data:image/png;base64,@@@not*base64@@@", "invalid base64"),
    ("data:image/png;base64,iVBORw0KGgo", "invalid base64"),  # bad padding
    ("data:text/plain;base64,aGVsbG8gd29ybGQ=", "text/plain"),
    ("data:application/octet-stream;base64,aGVsbG8=", "application/octet-stream"),
    ("data:image/png,rawdata", "data URL"),  # not base64
    ("data:image/png;base64", "data URL"),  # no comma
])
def test_malformed_data_url(url, match):
    with pytest.raises(ImageLoadError, match=match):
        load_image(url)
    with pytest.raises(ImageLoadError, match=match):
        decode_data_url(url)
    with pytest.raises(ImageLoadError, match=match):
        image_size(url)


def test_data_url_with_non_image_payload():
    url = "data:image/png;base64," + base64.b64encode(b"plain text, not a PNG").decode()
    with pytest.raises(NotAnImageError):
        load_image(url)
    with pytest.raises(EmptyImageError):
        load_image("data:image/png;base64,")


def test_wrong_media_type_is_not_an_image_error():
    with pytest.raises(NotAnImageError):
        decode_data_url("data:text/plain;base64,aGVsbG8=")


# ----------------------------------------------------------------------------------------------
# extreme sizes and multi-frame files


@pytest.mark.parametrize("size", [(1, 1), (1, 10000), (10000, 1)])
def test_extreme_sizes(tmp_path, size):
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[0, 0] = RED
    a[-1, -1] = BLUE if size != (1, 1) else RED
    path = tmp_path / f"{w}x{h}.png"
    Image.fromarray(a).save(path)
    img = load_image(path)
    assert_rgb8(img, size)
    assert image_size(path) == size
    assert img.getpixel((0, 0)) == RED
    assert img.getpixel((w - 1, h - 1)) == (BLUE if size != (1, 1) else RED)


def test_one_pixel_transparent_and_jpeg():
    assert load_image(Image.new("RGBA", (1, 1), (0, 0, 0, 0))).getpixel((0, 0)) == WHITE
    assert load_image(encode(Image.new("RGB", (1, 1), GREEN), "JPEG")).size == (1, 1)


def colour_frames(size=(12, 8)) -> list[Image.Image]:
    return [Image.new("RGB", size, c) for c in (RED, GREEN, BLUE)]


def test_animated_gif_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    first, *rest = colour_frames()
    first.save(path, save_all=True, append_images=rest, duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    img = load_image(path)
    assert_rgb8(img, (12, 8))
    assert_close(img.getpixel((5, 5)), RED, 2)
    assert image_size(path) == (12, 8)


def test_animated_gif_already_open_at_a_later_frame(tmp_path):
    path = tmp_path / "anim.gif"
    first, *rest = colour_frames()
    first.save(path, save_all=True, append_images=rest, duration=50)
    with Image.open(path) as opened:
        opened.seek(2)
        assert_close(opened.convert("RGB").getpixel((5, 5)), BLUE, 2)
        assert_close(load_image(opened).getpixel((5, 5)), RED, 2)


def test_animated_png_first_frame(tmp_path):
    path = tmp_path / "anim.png"
    first, *rest = colour_frames()
    first.save(path, save_all=True, append_images=rest, duration=50)
    with Image.open(path) as check:
        assert check.n_frames == 3
    assert load_image(path).getpixel((5, 5)) == RED
    assert image_size(path) == (12, 8)


def test_multipage_tiff_first_page(tmp_path):
    path = tmp_path / "pages.tif"
    pages = [Image.new("RGB", (20, 10), RED), Image.new("RGB", (40, 40), GREEN)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    with Image.open(path) as check:
        assert check.n_frames == 2
    img = load_image(path)
    assert img.size == (20, 10) and img.getpixel((3, 3)) == RED
    assert image_size(path) == (20, 10)


@pytest.mark.parametrize("kind", ["nul", "long name", "long path", "not a directory"])
def test_paths_the_os_refuses_raise_invalid_image_path(tmp_path, kind):
    """A NUL byte or an over-long path is a typed ImageLoadError with a one-line message, never a
    bare ValueError/OSError (and a NUL byte is not reported as "no such file")."""
    from hires_lmm.image.load import InvalidImagePathError

    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    src = {"nul": str(tmp_path / "ok.png") + "\x00",
           "long name": str(tmp_path / ("a" * 6000 + ".png")),
           "long path": str(tmp_path / "/".join(["b" * 250] * 30)),
           "not a directory": str(tmp_path / "ok.png" / "x.png")}[kind]
    want = {"nul": "NUL byte", "long name": "too long", "long path": "too long",
            "not a directory": "not a directory"}[kind]
    for fn in (load_image, image_size):
        for s in (src, Path(src)):
            with pytest.raises(InvalidImagePathError) as ei:
                fn(s)
            msg = str(ei.value)
            assert isinstance(ei.value, ImageLoadError) and not isinstance(ei.value, ImageNotFoundError)
            assert want in msg and "\n" not in msg and len(msg) < 400, msg
    assert load_image(tmp_path / "ok.png").size == (4, 4)
