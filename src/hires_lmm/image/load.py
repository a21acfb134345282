"""One safe image loader, used everywhere an image enters the library.

* EXIF orientation is applied (a phone photo taken in portrait stays in portrait).
* Every PIL mode is converted to 8-bit RGB deliberately: palette and alpha images are composited
  on a defined background (white unless told), 16-bit and 32-bit greyscale are rescaled (not
  clipped), CMYK and YCbCr go through PIL's converters, 1-bit becomes black and white.
* A pixel limit guards against decompression bombs; it is checked on the header, before any
  pixel is decoded.
* Missing, empty, truncated and non-image inputs, and paths the operating system cannot take (a
  NUL byte, a name too long), raise :class:`ImageLoadError` subclasses whose one-line message
  names the file (shortened when long) and the problem.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

#: Default pixel limit: 64 megapixels (an 8000×8000 photo). Large enough for real photographs and
#: scans, small enough that one decoded image (3 bytes per pixel) cannot exhaust memory.
DEFAULT_MAX_PIXELS = 64_000_000

ImageSource = str | os.PathLike | bytes | bytearray | IO[bytes] | Image.Image

_pil_lock = threading.Lock()


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names the source and the problem."""


class ImageNotFoundError(ImageLoadError, FileNotFoundError):
    """The file does not exist."""


class EmptyImageError(ImageLoadError):
    """The file or buffer holds no bytes."""


class NotAnImageError(ImageLoadError):
    """The bytes are not an image format PIL can decode."""


class TruncatedImageError(ImageLoadError):
    """The image data ends early or is corrupt."""


class ImageTooLargeError(ImageLoadError):
    """The image has more pixels than the configured limit (decompression-bomb guard)."""


class InvalidImagePathError(ImageLoadError):
    """The path cannot name a file: it holds a NUL byte, or the operating system refuses it (too
    long, a component too long, permission denied on a directory, ...)."""


#: paths longer than this are shown shortened in messages (one readable line, whatever the input)
_SHOWN_PATH_CHARS = 120


def shorten_path(path: str | bytes) -> str:
    """``repr`` of a path, shortened in the middle when long (a 6000-character path must not make a
    6000-character message)."""
    text = repr(path)
    if len(text) <= _SHOWN_PATH_CHARS:
        return text
    half = _SHOWN_PATH_CHARS // 2
    return f"{text[:half]}...{text[-half:]} ({len(path):,} characters)"


def _describe(src: object) -> str:
    if isinstance(src, (str, os.PathLike)):
        return f"image file {shorten_path(os.fspath(src))}"
    if isinstance(src, (bytes, bytearray)):
        return f"image data ({len(src)} bytes)"
    return "image stream"


@contextmanager
def _no_pil_bomb_check() -> Iterator[None]:
    """Our own pixel limit replaces PIL's global one while a header is read (thread-safe)."""
    with _pil_lock:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _pil_limit_for_decoding(max_pixels: int | None) -> AbstractContextManager[None]:
    """Some decoders (TIFF, GIF, ...) consult PIL's global limit again while decoding. Keep it as a
    second guard, but lift it when it is stricter than ours, so that a caller's ``max_pixels``
    (``None`` included) is what decides. Lifting it takes the lock, so only such loads serialise."""
    pil = Image.MAX_IMAGE_PIXELS
    if pil is not None and (max_pixels is None or max_pixels > pil):
        return _no_pil_bomb_check()
    return nullcontext()


def decode_data_url(url: str) -> bytes:
    """Bytes of a ``data:image/...;base64,`` URL; ImageLoadError when malformed."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or ";base64" not in head:
        raise ImageLoadError("expected a data URL of the form 'data:image/<type>;base64,<data>'")
    if not head[5:].startswith("image/"):
        raise NotAnImageError(f"data URL has media type {head[5:].split(';')[0]!r}, not image/*")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageLoadError(f"data URL holds invalid base64: {e}") from None


def _open(src: ImageSource, what: str) -> Image.Image:
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        # checked first: Path.exists() answers False for a NUL byte ("no such file" would mislead)
        if "\0" in str(path):
            raise InvalidImagePathError(f"{what}: the path contains a NUL byte, which no file name can hold")
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ImageNotFoundError(f"{what}: no such file") from None
        except OSError as e:  # ENAMETOOLONG, EACCES, ELOOP, ENOTDIR, ...: the OS refuses the path itself
            reason = (e.strerror or type(e).__name__).lower()
            raise InvalidImagePathError(f"{what}: cannot use this path ({reason})") from None
        if stat.S_ISDIR(st.st_mode):
            raise ImageLoadError(f"{what}: is a directory, not an image file")
        if st.st_size == 0:
            raise EmptyImageError(f"{what}: the file is empty (0 bytes)")
        fp: object = path
    elif isinstance(src, (bytes, bytearray)):
        if len(src) == 0:
            raise EmptyImageError(f"{what}: no bytes")
        fp = io.BytesIO(bytes(src))
    else:
        fp = src
    try:
        with _no_pil_bomb_check():
            return Image.open(fp)  # type: ignore[arg-type]
    except UnidentifiedImageError:
        raise NotAnImageError(f"{what}: not a recognised image format") from None
    except OSError as e:
        if e.errno is not None:  # the OS refused to open the file (its message would repeat the whole path)
            raise InvalidImagePathError(f"{what}: cannot open the file ({(e.strerror or 'error').lower()})") from None
        raise TruncatedImageError(f"{what}: cannot read image header ({e})") from None


def _png_trailing_exif(img: ImageFile.ImageFile) -> bytes | None:
    """The eXIf chunk that follows the image data of a PNG not yet decoded, found by skipping from
    chunk header to chunk header (nothing is decompressed); None when there is none.

    PIL's own ``PngImageFile.getexif()`` decodes the whole image to find it. Raises LookupError
    where this cannot decide (an animated PNG, an odd chunk layout, a text chunk that might hold
    ImageMagick's "Raw profile type exif"), so that the caller falls back to PIL.
    """
    fp = img.fp
    if fp is None or not img.tile or getattr(img, "is_animated", False):
        raise LookupError
    pos = fp.tell()
    try:
        fp.seek(img.tile[0].offset - 8)  # the first IDAT chunk's length and type
        while True:
            head = fp.read(8)
            if len(head) < 8:
                return None
            length, cid = struct.unpack(">I4s", head)
            if not cid.isalpha():
                raise LookupError
            if cid == b"eXIf":
                return fp.read(length)
            if cid == b"IEND":
                return None
            if cid in (b"tEXt", b"zTXt", b"iTXt"):
                raise LookupError
            fp.seek(length + 4, os.SEEK_CUR)  # data and CRC
    finally:
        fp.seek(pos)


def _orientation(img: Image.Image) -> int:
    # only a file PIL opened has a format (and tiles); a plain Image's format is None
    if img.format == "PNG" and isinstance(img, ImageFile.ImageFile) and "exif" not in img.info and img.tile:
        try:  # the PNG's header had no eXIf chunk: look after the image data without decoding it
            exif = _png_trailing_exif(img)
            if exif is None:
                return 1
            e = Image.Exif()
            e.load(exif)
            return int(e.get(0x0112, 1))
        except Exception:
            pass
    return int(img.getexif().get(0x0112, 1))


def _release(img: Image.Image) -> None:
    """Let go of an image we opened: close its file if PIL opened it (a path), but never a stream
    the caller passed in (``Image.close()`` would close that too)."""
    img.__exit__(None, None, None)  # what ``with Image.open(...)`` does on leaving


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    try:
        orientation = _orientation(img)
    except Exception:  # a broken EXIF block must not make the image unreadable
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def image_size(src: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(w, h)`` as the model will see it (EXIF orientation applied), reading only the header."""
    if isinstance(src, str) and src.startswith("data:"):
        src = decode_data_url(src)
    what = _describe(src)
    if isinstance(src, Image.Image):
        _check_pixels(src.size, max_pixels, what)
        return _oriented_size(src)
    img = _open(src, what)
    try:
        _check_pixels(img.size, max_pixels, what)  # the pixel count does not depend on orientation
        return _oriented_size(img)
    finally:
        _release(img)


def _check_pixels(size: tuple[int, int], max_pixels: int | None, what: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise TruncatedImageError(f"{what}: has an empty size {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(
            f"{what}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
            "(a decompression-bomb guard; raise max_pixels to allow it)")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparent pixels are composited on ``background``; high-bit-depth greyscale is rescaled to
    0-255 from its type's full range (``I;16*``: 0-65535; ``I``: 0-65535 when the data fits,
    else its own min-max; ``F``: 0-1 when the data fits, else 0-255 clipped).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("1", "L"):
        return img.convert("RGB")
    if mode == "P":
        has_alpha = "transparency" in img.info or img.palette is not None and img.palette.mode == "RGBA"
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        if mode == "F":
            hi = 1.0 if a.size == 0 or np.nanmax(a) <= 1.0 else 255.0
            a = np.nan_to_num(a) / hi * 255.0
        elif mode.startswith("I;16") or (a.size and a.min() >= 0 and a.max() <= 65535):
            a = a / 257.0
        else:
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / max(hi - lo, 1.0) * 255.0
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    # CMYK, YCbCr, LAB, HSV and the rest: PIL's own converters
    return img.convert("RGB")


def load_image(src: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode an image safely into an 8-bit RGB ``PIL.Image`` with EXIF orientation applied.

    Args:
        src: a path, raw bytes, a binary stream, a ``data:image/...;base64,`` URL string, or an
            already-open PIL image.
        max_pixels: refuse images with more pixels (checked before decoding); None disables.
        background: RGB colour behind transparent pixels.

    Raises:
        ImageLoadError (or a subclass) naming the source and what is wrong.
    """
    if isinstance(src, str) and src.startswith("data:"):
        src = decode_data_url(src)
    what = _describe(src)
    opened: Image.Image | None
    if isinstance(src, Image.Image):
        opened, img = None, src
    else:
        opened = _open(src, what)
        img = opened
    try:
        # on the stored size, before anything else: reading a PNG's EXIF can decode the pixels
        _check_pixels(img.size, max_pixels, what)
        with _pil_limit_for_decoding(max_pixels):
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated GIF / multi-page TIFF: the first frame
            img.load()
        try:
            img = ImageOps.exif_transpose(img) or img
        except Exception:  # a broken EXIF block: keep the stored orientation, as image_size does
            pass
        out = to_rgb(img, background)
        if out is src or out is opened:  # never hand back the caller's image or our file-backed one
            out = out.copy()
        out.load()
        return out
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{what}: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg or isinstance(e, (EOFError, SyntaxError)):
            raise TruncatedImageError(f"{what}: image data is truncated or corrupt ({msg})") from None
        raise TruncatedImageError(f"{what}: cannot decode image ({msg})") from None
    finally:
        if opened is not None:
            _release(opened)
