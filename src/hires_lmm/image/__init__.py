"""Images in: safe decoding (:mod:`.load`), rendering views to tensors (:mod:`.render`), and
pictures of a plan (:mod:`.overlay`)."""

from .load import (
    DEFAULT_MAX_PIXELS,
    EmptyImageError,
    ImageLoadError,
    ImageNotFoundError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    image_size,
    load_image,
    to_rgb,
)

__all__ = ["DEFAULT_MAX_PIXELS", "EmptyImageError", "ImageLoadError", "ImageNotFoundError",
           "ImageTooLargeError", "NotAnImageError", "TruncatedImageError", "image_size", "load_image",
           "to_rgb"]
