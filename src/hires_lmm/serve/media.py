"""Where a request's images come from, and the limits on them.

* ``data:image/<type>;base64,...`` URLs: always accepted (decoded with
  :func:`hires_lmm.image.load.decode_data_url`, so bad base64 and non-image media types are
  refused with a clear message).
* Local files (an absolute path, a path relative to the allowed directory, or a ``file://`` URL):
  only under ``--allowed-local-media-path``, checked after resolving symbolic links and ``..``.
* ``http(s)://`` URLs: refused. The server fetches nothing from the network (no SSRF, no
  unbounded downloads); the client sends the bytes as a data URL.

Every image is then opened through :func:`hires_lmm.image.load.load_image` with the server's
``max_pixels`` (checked on the header, before decoding: decompression bombs never decode).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from PIL import Image

from ..image import ImageLoadError, ImageTooLargeError, image_size, load_image
from ..image.load import InvalidImagePathError, decode_data_url, shorten_path
from .errors import APIError, bad_request

ImageBytesOrPath = bytes | Path


def resolve_image_url(url: str, param: str, allowed_dir: str | os.PathLike | None) -> ImageBytesOrPath:
    """The bytes (data URL) or the checked local path an image URL names."""
    if url.startswith("data:"):
        try:
            return decode_data_url(url)
        except ImageLoadError as e:
            raise bad_request(f"'{param}': {e}", param=param, code="invalid_image") from None
    scheme = urlsplit(url).scheme.lower() if "://" in url[:16] else ""
    if scheme in ("http", "https"):
        raise bad_request(f"'{param}': remote image URLs are not fetched by this server; send the image inline as "
                          "a data URL ('data:image/png;base64,...')", param=param, code="remote_media_not_supported")
    if scheme and scheme != "file":
        raise bad_request(f"'{param}': unsupported URL scheme {scheme!r}; send a data URL", param=param,
                          code="invalid_image_url")
    if allowed_dir is None:
        raise APIError(403, f"'{param}': local files are not served; send the image as a data URL, or start the "
                            "server with --allowed-local-media-path DIR", type="permission_error", param=param,
                       code="local_media_not_allowed")
    raw = unquote(urlsplit(url).path) if scheme == "file" else url
    # refused before resolving: Path.resolve() raises ValueError on a NUL byte (a 500 otherwise),
    # and "%00" in a file:// URL decodes to one
    if "\0" in raw:
        raise bad_request(f"'{param}': the image path {shorten_path(raw)} contains a NUL byte, which no file name "
                          "can hold", param=param, code="invalid_image_url")
    root = Path(allowed_dir).resolve()
    path = Path(raw)
    try:
        path = (path if path.is_absolute() else root / path).resolve()
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: a symlink loop on older Pythons
        raise bad_request(f"'{param}': cannot use the image path {shorten_path(raw)} ({type(e).__name__})",
                          param=param, code="invalid_image_url") from None
    if not path.is_relative_to(root):
        raise APIError(403, f"'{param}': {shorten_path(raw)} is outside the allowed local media directory",
                       type="permission_error", param=param, code="local_media_not_allowed")
    return path


def _load_error(e: ImageLoadError, param: str) -> APIError:
    if isinstance(e, ImageTooLargeError):
        code = "image_too_large"
    elif isinstance(e, InvalidImagePathError):
        code = "invalid_image_url"  # the path is at fault, not an image
    else:
        code = "invalid_image"
    return bad_request(f"'{param}': {e}", param=param, code=code)


def checked_size(src: ImageBytesOrPath, param: str, max_pixels: int | None) -> tuple[int, int]:
    """``(w, h)`` from the header only, with the pixel limit applied."""
    try:
        return image_size(src, max_pixels=max_pixels)
    except ImageLoadError as e:
        raise _load_error(e, param) from None


def prepare_checked(model: Any, src: ImageBytesOrPath, param: str, max_pixels: int | None) -> Any:
    """``model.prepare_image(src, fast=True)`` (plan from the header, reduced decode), with load
    errors answered as :func:`load_checked` answers them."""
    try:
        return model.prepare_image(src, fast=True, max_pixels=max_pixels)
    except ImageLoadError as e:
        raise _load_error(e, param) from None


def load_checked(src: ImageBytesOrPath, param: str, max_pixels: int | None) -> Image.Image:
    """The decoded RGB image, with the pixel limit applied before decoding."""
    try:
        return load_image(src, max_pixels=max_pixels)
    except ImageLoadError as e:
        raise _load_error(e, param) from None
