"""``hires serve``: an OpenAI-compatible HTTP server with continuous batching, and a web page.

* :mod:`.protocol`: request bodies parsed and validated (OpenAI's shapes), errors naming the field.
* :mod:`.media`: data URLs, local files under ``--allowed-local-media-path``, no remote fetches.
* :mod:`.service`: settings and limits (:class:`ServeConfig`), the chat template, prompt ids
  with ``<image>`` placeholders, images loaded / planned / rendered, lengths checked.
* :mod:`.engine`: the continuous-batching step loop on its own thread.
* :mod:`.app`: the Starlette application (``create_app``) and :class:`BackgroundServer`.
* :mod:`.page`: the web page at ``/``.

Needs ``starlette`` and ``uvicorn`` (imported only when serving).
"""

from .config import ServeConfig
from .errors import APIError

__all__ = ["APIError", "ServeConfig", "create_app"]


def create_app(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - lazy: starlette only when serving
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
