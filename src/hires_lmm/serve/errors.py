"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered to the client (never a traceback).

    Args:
        status: the HTTP status (400 bad request, 403 forbidden media, 404 unknown model or route,
            413 body too large, 503 overloaded, 500 a failure of the server itself).
        message: what is wrong, for a person.
        type: OpenAI's error type (``invalid_request_error``, ``permission_error``,
            ``not_found_error``, ``server_error``).
        param: the request field at fault (``messages[0].content[1].image_url.url``), or None.
        code: a stable machine-readable code (``invalid_json``, ``image_too_large``, ...).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_json(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"APIError({self.status}, {self.message!r}, code={self.code!r})"


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
