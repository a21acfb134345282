"""Parsing and validating OpenAI request bodies (pure Python, no model, no torch).

Every problem becomes an :class:`~hires_lmm.serve.errors.APIError` naming the field
(``param``), so a client sees ``400 {"error": {"message": "...", "param": "messages[1].content"}}``.
Unknown top-level fields are ignored (clients send many); fields whose value this server cannot
honour (``n`` > 1, ``logprobs``, ``tools``, a ``response_format`` other than text) are refused rather than silently ignored.

A request may set its own visual-token budget (the planners' ``max_visual_tokens``, see
docs/methods.md "Visual-token budget"): at the top level of the body (what the OpenAI client's
``extra_body={"max_visual_tokens": B}`` sends) or as ``mm_processor_kwargs.max_visual_tokens``
(vLLM's spelling); a positive integer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import APIError, bad_request

IMAGE_PLACEHOLDER = "<image>"

#: roles accepted in ``messages``; "developer" is OpenAI's newer name for "system"
ROLES = ("system", "developer", "user", "assistant")


@dataclass
class Message:
    """One message, normalised: the role (system/user/assistant) and its parts in order, each
    ``("text", str)`` or ``("image", url, param)``."""

    role: str
    parts: list[tuple[Any, ...]]


@dataclass
class ChatRequest:
    """A validated ``POST /v1/chat/completions`` body."""

    model: str
    messages: list[Message]
    max_tokens: int | None = None
    temperature: float = 1.0  # OpenAI's default; send 0 for greedy decoding
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    images: list[tuple[str, str]] = field(default_factory=list)  # (url, param) in placeholder order
    max_visual_tokens: int | None = None  # the request's budget; None: the model config's
    budget_param: str = "max_visual_tokens"  # where the budget was given (named in its errors)


@dataclass
class PlanRequest:
    """A validated ``POST /v1/plan`` body."""

    image: str
    method: str | None = None
    overlay: bool = True
    overlay_width: int = 800
    max_visual_tokens: int | None = None  # the request's budget; None: the model config's
    budget_param: str = "max_visual_tokens"


def parse_json_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; 400 ``invalid_json`` when it is not one."""
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(body, parse_constant=no_constants)
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not UTF-8 text: {e}", code="invalid_json") from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, not {_kind(data)}", code="invalid_json")
    return data


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _type_error(param: str, expected: str, v: Any) -> APIError:
    return bad_request(f"'{param}' must be {expected}, got {_kind(v)}", param=param, code="invalid_type")


def _missing(param: str) -> APIError:
    return bad_request(f"missing required parameter '{param}'", param=param, code="missing_required_parameter")


def _number(data: dict[str, Any], key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = data.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _type_error(key, "a number", v)
    if v > hi or v < lo or (lo_open and v <= lo):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad_request(f"'{key}' must be in {interval}, got {v}", param=key, code="invalid_value")
    return float(v)


def _integer(data: dict[str, Any], key: str) -> int | None:
    v = data.get(key)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(key, "an integer", v)
    return v


def _boolean(data: dict[str, Any], key: str, default: bool = False) -> bool:
    v = data.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _type_error(key, "a boolean", v)
    return v


def parse_budget(data: dict[str, Any]) -> tuple[int | None, str]:
    """The request's visual-token budget and the field it came from: ``max_visual_tokens`` at the
    top level, or ``mm_processor_kwargs.max_visual_tokens`` (vLLM's spelling; other keys there are
    refused, as this server has no other processor options). Both given: they must agree."""
    found: list[tuple[int, str]] = []
    top = data.get("max_visual_tokens")
    if top is not None:
        found.append((_budget_value(top, "max_visual_tokens"), "max_visual_tokens"))
    mm = data.get("mm_processor_kwargs")
    if mm is not None:
        if not isinstance(mm, dict):
            raise _type_error("mm_processor_kwargs", "an object", mm)
        unknown = sorted(set(mm) - {"max_visual_tokens"})
        if unknown:
            raise bad_request(f"'mm_processor_kwargs.{unknown[0]}' is not supported by this server; its only "
                              "processor option is max_visual_tokens", param=f"mm_processor_kwargs.{unknown[0]}",
                              code="unsupported_parameter")
        if mm.get("max_visual_tokens") is not None:
            key = "mm_processor_kwargs.max_visual_tokens"
            found.append((_budget_value(mm["max_visual_tokens"], key), key))
    if not found:
        return None, "max_visual_tokens"
    if len(found) == 2 and found[0][0] != found[1][0]:
        raise bad_request(f"'max_visual_tokens' ({found[0][0]}) and 'mm_processor_kwargs.max_visual_tokens' "
                          f"({found[1][0]}) disagree; send one", param="max_visual_tokens", code="invalid_value")
    return found[0]


def _budget_value(v: Any, param: str) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(param, "a positive integer (a visual-token budget)", v)
    if v < 1:
        raise bad_request(f"'{param}' must be at least 1, got {v}", param=param, code="invalid_value")
    return v


def _parts(content: Any, param: str, role: str) -> list[tuple[Any, ...]]:
    if isinstance(content, str):
        return [("text", content)]
    if content is None:
        raise bad_request(f"'{param}' is null; this server supports no tool calls, send the text",
                          param=param, code="invalid_type")
    if not isinstance(content, list):
        raise _type_error(param, "a string or an array of content parts", content)
    out: list[tuple[Any, ...]] = []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _type_error(p, "an object with a 'type'", part)
        kind = part.get("type")
        if kind is None:
            raise _missing(f"{p}.type")
        if kind == "text":
            text = part.get("text")
            if text is None:
                raise _missing(f"{p}.text")
            if not isinstance(text, str):
                raise _type_error(f"{p}.text", "a string", text)
            out.append(("text", text))
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"'{p}': images are only accepted in user messages, not in {role} messages",
                                  param=p, code="invalid_value")
            img = part.get("image_url")
            if img is None:
                raise _missing(f"{p}.image_url")
            if isinstance(img, dict):
                url = img.get("url")
                if url is None:
                    raise _missing(f"{p}.image_url.url")
                up = f"{p}.image_url.url"
            else:
                url, up = img, f"{p}.image_url"
            if not isinstance(url, str):
                raise _type_error(up, "a string (a data URL or a local path)", url)
            if not url:
                raise bad_request(f"'{up}' is empty", param=up, code="invalid_value")
            out.append(("image", url, up))
        else:
            raise bad_request(f"'{p}.type' {kind!r} is not supported; use 'text' or 'image_url'",
                              param=f"{p}.type", code="invalid_value")
    return out


def parse_messages(messages: Any) -> list[Message]:
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _type_error("messages", "an array of messages", messages)
    if not messages:
        raise bad_request("'messages' is empty; send at least one user message", param="messages",
                          code="invalid_value")
    out: list[Message] = []
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _type_error(p, "an object with 'role' and 'content'", m)
        role = m.get("role")
        if role is None:
            raise _missing(f"{p}.role")
        if not isinstance(role, str):
            raise _type_error(f"{p}.role", "a string", role)
        if role not in ROLES:
            raise bad_request(f"'{p}.role' {role!r} is not supported; use one of {', '.join(ROLES)}",
                              param=f"{p}.role", code="invalid_value")
        if "content" not in m:
            raise _missing(f"{p}.content")
        role = "system" if role == "developer" else role
        parts = _parts(m["content"], f"{p}.content", role)
        for part in parts:
            if part[0] == "text" and IMAGE_PLACEHOLDER in part[1]:
                raise bad_request(f"'{p}.content' contains the placeholder {IMAGE_PLACEHOLDER!r}, which this server "
                                  "inserts itself: send each image as an image_url part instead",
                                  param=f"{p}.content", code="invalid_value")
        out.append(Message(role, parts))
    return out


def _check_response_format(rf: Any) -> None:
    """``response_format``: only ``{"type": "text"}`` (the default meaning: free text) is honoured;
    JSON mode and JSON schemas would need constrained decoding, so they are refused, never ignored
    (a client relying on them would otherwise get unvalidated text back)."""
    if rf is None:
        return
    if not isinstance(rf, dict):
        raise _type_error("response_format", "an object with a 'type'", rf)
    kind = rf.get("type")
    if kind is None:
        raise _missing("response_format.type")
    if not isinstance(kind, str):
        raise _type_error("response_format.type", "a string", kind)
    if kind != "text":
        raise bad_request(f"'response_format' of type {kind!r} is not supported by this server (no constrained "
                          "decoding); only {\"type\": \"text\"} is", param="response_format",
                          code="unsupported_parameter")


def parse_chat_request(data: dict[str, Any], served_model_name: str) -> ChatRequest:
    """Validate a chat-completions body (structure and types only; images are not opened here)."""
    model = data.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if model != served_model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served_model_name!r}",
                       type="not_found_error", param="model", code="model_not_found")
    messages = parse_messages(data.get("messages"))

    max_tokens = _integer(data, "max_completion_tokens")
    alias = _integer(data, "max_tokens")
    key = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    if max_tokens is not None and alias is not None and alias != max_tokens:
        raise bad_request("'max_tokens' and 'max_completion_tokens' disagree; send one", param="max_tokens",
                          code="invalid_value")
    max_tokens = max_tokens if max_tokens is not None else alias
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"'{key}' must be at least 1, got {max_tokens}", param=key, code="invalid_value")

    temperature = _number(data, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(data, "top_p", 1.0, 0.0, 1.0, lo_open=True)

    n = _integer(data, "n")
    if n is not None and n != 1:
        raise bad_request(f"'n' must be 1 (this server returns one choice), got {n}", param="n", code="invalid_value")

    stop_v = data.get("stop")
    if stop_v is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_v, str):
        stop = (stop_v,)
    elif isinstance(stop_v, list) and all(isinstance(s, str) for s in stop_v):
        stop = tuple(stop_v)
    else:
        raise _type_error("stop", "a string or an array of strings", stop_v)
    if len(stop) > 16:
        raise bad_request(f"'stop' has {len(stop)} strings; at most 16", param="stop", code="invalid_value")
    if any(not s for s in stop):
        raise bad_request("'stop' contains an empty string", param="stop", code="invalid_value")

    seed = _integer(data, "seed")
    if seed is not None and not -(2 ** 63) <= seed < 2 ** 64:
        raise bad_request("'seed' must fit in 64 bits", param="seed", code="invalid_value")

    stream = _boolean(data, "stream")
    include_usage = False
    so = data.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise _type_error("stream_options", "an object", so)
        if not stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options",
                              code="invalid_value")
        include_usage = _boolean(so, "include_usage")

    if _boolean(data, "logprobs"):
        raise bad_request("'logprobs' is not supported by this server", param="logprobs", code="unsupported_parameter")
    for k in ("tools", "functions"):
        if data.get(k):
            raise bad_request(f"'{k}' is not supported by this server", param=k, code="unsupported_parameter")
    _check_response_format(data.get("response_format"))

    budget, budget_param = parse_budget(data)

    images = [(part[1], part[2]) for m in messages for part in m.parts if part[0] == "image"]
    return ChatRequest(model=model, messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                       stop=stop, seed=seed, stream=stream, include_usage=include_usage, images=images,
                       max_visual_tokens=budget, budget_param=budget_param)


def parse_plan_request(data: dict[str, Any], methods: tuple[str, ...]) -> PlanRequest:
    """Validate a ``POST /v1/plan`` body: ``{"image": url, "method"?: name, "overlay"?: bool,
    "overlay_width"?: int, "max_visual_tokens"?: int}`` (the budget also as
    ``mm_processor_kwargs.max_visual_tokens``, as in a chat request)."""
    image = data.get("image")
    if image is None:
        raise _missing("image")
    if not isinstance(image, str):
        raise _type_error("image", "a string (a data URL or a local path)", image)
    method = data.get("method")
    if method is not None:
        if not isinstance(method, str):
            raise _type_error("method", "a string", method)
        if method not in methods:
            raise bad_request(f"unknown method {method!r}; choose from {', '.join(methods)}", param="method",
                              code="invalid_value")
    width = _integer(data, "overlay_width")
    if width is not None and not 200 <= width <= 2400:
        raise bad_request("'overlay_width' must be in [200, 2400]", param="overlay_width", code="invalid_value")
    budget, budget_param = parse_budget(data)
    return PlanRequest(image=image, method=method, overlay=_boolean(data, "overlay", True),
                       overlay_width=width or 800, max_visual_tokens=budget, budget_param=budget_param)
