"""The server's settings (no heavy imports: the ``hires`` command line reads the defaults)."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass
class ServeConfig:
    """The server's settings; every limit is answered with an OpenAI-shaped 4xx error.

    Attributes:
        served_model_name: the ``model`` clients must send (default: the model directory's name).
        allowed_local_media_path: a directory whose files (and only those) may be named as images.
        chat_template: "auto" (the tokenizer's own template if it has one, else vicuna_v1) or a
            template name.
        max_batch: most requests decoding together in the step loop.
        max_prefill_tokens: most prompt tokens prefilled together when requests join.
        batch_wait_ms: how long an idle server waits for more requests before prefilling.
        max_waiting: most queued requests; beyond that 503.
        max_request_bytes: largest request body (413 beyond).
        max_image_pixels: largest image, width × height (checked on the header: bombs never decode).
        max_images_per_request: most images in one request.
        max_model_len: most tokens in prompt (text + visual) + completion; None: the LLM's
            ``max_position_embeddings``.
        default_max_tokens: completion length when a request gives none; None: what is left of
            ``max_model_len``.
        prep_workers: threads that parse requests and decode / plan / render images.
        fast_decode: decode large images reduced when the plan needs less than their full
            resolution (:func:`hires_lmm.model.prepare_image`'s ``fast``; 2-4x faster on large
            JPEGs, within a few grey levels of the exact pixels).
    """

    served_model_name: str = "hires-lmm"
    allowed_local_media_path: str | None = None
    chat_template: str = "auto"
    max_batch: int = 16
    max_prefill_tokens: int = 16384
    batch_wait_ms: float = 5.0
    max_waiting: int = 256
    max_request_bytes: int = 32 * MiB
    max_image_pixels: int = 25_000_000
    max_images_per_request: int = 8
    max_model_len: int | None = None
    default_max_tokens: int | None = None
    prep_workers: int = 2
    fast_decode: bool = False
