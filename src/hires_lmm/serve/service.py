"""What the server knows about its model: the configuration (limits), the chat template, and
turning a validated request into the engine's input (prompt ids with ``<image>`` placeholders,
images loaded, planned and rendered, lengths checked).

Prompt format. ``chat_template="auto"`` uses the tokenizer's own chat template when it has one
(the model's own format), else ``vicuna_v1`` (LLaVA-1.5's ``SYSTEM USER: ... ASSISTANT:``); any
name of :func:`hires_lmm.data.templates.get_template` can be forced. A user message's parts
become one text, joined with "\\n", where each image part is one ``<image>`` placeholder in the
order of the parts (so ``[image, text]`` is LLaVA's ``"<image>\\n<text>"``); consecutive
messages of one role are joined with "\\n"; a system (or developer) message may only come first
(the template's default system prompt is used when there is none). The conversation must end with
a user message. The placeholders are replaced by the image's visual tokens in
:meth:`HiresLMM.build_inputs`.

Long prompts. Tokenising costs time and memory in proportion to the text, so the text is bounded
by characters first: no token covers more than :func:`max_chars_per_token` characters (``C``), so
a text of ``n`` characters has at least ``n / C`` tokens, and a text longer than
``max_model_len * C`` characters cannot fit; it is refused at once, untokenised. What is
tokenised is tokenised on a copy of the tokenizer owned by the preparing thread (a pool of
copies), never on the engine's: a long prompt does not hold up the decoding of running streams,
and two threads never share a fast tokenizer (its Rust object is not safe to use from two threads
while one changes its truncation or padding settings, which every ``tokenizer(...)`` call does).

Visual tokens. Every image is counted from its plan before anything is decoded or encoded
(:meth:`HiresLMM.plan`: a composed method's count is its parts'), within the request's
``max_visual_tokens`` when it sets one (over the model's ``plan_options``); the images are then
planned and rendered by :meth:`HiresLMM.prepare_image` with the same options (the same plan: for a
composed method its parts' count, and under a budget the views that count chose), so
``usage.prompt_tokens`` is that count plus the text's. An image no plan fits within the budget is
a 400 naming the budget. ``/v1/plan`` of the model's method is the same plan, with the parts' cost.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import math
import os
import queue
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..data.templates import ChatTemplate, TemplateError, encode_segments, get_template
from ..image import ImageLoadError
from ..model import HiresLMM
from ..plan import METHODS, Plan, plan_image
from ..plan.budget import BudgetError
from ..plan.cost import CostReport, plan_cost
from ..processing import ImageInput, method_spec_of
from ..text import IMAGE_TOKEN
from .config import ServeConfig
from .engine import GenRequest, SamplingParams
from .errors import APIError, bad_request
from .media import ImageBytesOrPath, _load_error, checked_size, load_checked, resolve_image_url
from .protocol import ChatRequest, PlanRequest

log = logging.getLogger("hires_lmm.serve")

#: normalizers and pre-tokenizers (``tokenizers`` component types) that can make the text shorter
#: before it is split into tokens: BERT's cleaning and accent stripping, strip, NFC/NFKC
#: composition, SentencePiece's precompiled NMT normalisation, whitespace splitting that drops the
#: spaces. With one of them a token can stand for more source characters than its own length.
_SHRINKING = frozenset({"BertNormalizer", "StripAccents", "Strip", "NFC", "NFKC", "Precompiled", "Nmt",
                        "Whitespace", "WhitespaceSplit", "BertPreTokenizer", "CharDelimiterSplit"})
#: the margin applied to C for such tokenizers: NFC/NFKC compose at most 3 code points into one
#: (Hangul jamo), and prompts that only fit because most of their characters are whitespace or
#: control characters that would be dropped are not worth tokenising 4x more text for.
_SHRINK_MARGIN = 4


def _component_types(node: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every ``{"type": ...}`` object in a serialised normalizer / pre-tokenizer (Sequences nest)."""
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            yield node["type"], node
        for v in node.values():
            yield from _component_types(v)
    elif isinstance(node, list):
        for v in node:
            yield from _component_types(v)


def _can_shrink(tok: Any) -> bool:
    """Whether the tokenizer's pipeline may drop or merge characters before splitting (see
    ``_SHRINKING``); True when it cannot be inspected (a slow tokenizer), to stay safe."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return True
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 - an unserialisable pipeline: assume the worst
        return True
    for kind, node in _component_types([spec.get("normalizer"), spec.get("pre_tokenizer")]):
        if kind in _SHRINKING:
            return True
        if kind == "Replace":  # e.g. Llama's " " -> "▁" keeps the length; a shorter replacement does not
            pattern = node.get("pattern") or {}
            target = pattern.get("String") if isinstance(pattern, dict) else None
            if target is None or len(node.get("content", "")) < len(target):
                return True
        if kind == "Split" and node.get("behavior") == "Removed":
            return True
    return False


def max_chars_per_token(tok: Any) -> int:
    """``C``: an upper bound on the characters of request text that one token can stand for.

    A token's string in the vocabulary is at least as long as the text it decodes to: byte-level
    BPE spells each byte as one character (a character is one or more bytes), SentencePiece writes
    a space as "▁" (one for one) and a byte-fallback piece ``<0xE9>`` as six characters for at most
    one, WordPiece adds "##". Added (special) tokens match their own content. ``<image>`` is left
    out: the protocol refuses it in text. When the normalizer or pre-tokenizer may drop or merge
    characters (``_SHRINKING``), the bound is multiplied by ``_SHRINK_MARGIN``.
    """
    longest = max((len(t) for t in tok.get_vocab() if t != IMAGE_TOKEN), default=1)
    c = max(1, longest)
    return c * _SHRINK_MARGIN if _can_shrink(tok) else c


def resolve_template(model: HiresLMM, name: str) -> ChatTemplate:
    tok = model.tokenizer
    if name == "auto":
        name = "tokenizer" if getattr(tok, "chat_template", None) else "vicuna_v1"
    tpl = get_template(name)  # ValueError for an unknown name
    missing = tpl.missing_special_tokens(tok)
    if missing:
        raise ValueError(f"chat template {tpl.name!r} needs the special token(s) {missing}, which the model's "
                         "tokenizer lacks; choose another --chat-template")
    return tpl


def _model_max_len(model: HiresLMM) -> int:
    cfg = model.llm.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if n else 4096


class Service:
    """The model, its settings and request preparation (called on the preparation threads)."""

    def __init__(self, model: HiresLMM, config: ServeConfig) -> None:
        self.model = model
        self.config = config
        self.template = resolve_template(model, config.chat_template)
        self.max_model_len = config.max_model_len or _model_max_len(model)
        tok = model.tokenizer
        self.stop_token_ids = sorted({tok.eos_token_id, *self.template.stop_token_ids(tok)} - {None})
        self.created = int(time.time())
        self.max_chars_per_token = max_chars_per_token(tok)
        self.max_prompt_chars = self.max_model_len * self.max_chars_per_token
        log.info("prompts longer than %d characters are refused untokenised (%d tokens x at most %d characters "
                 "per token)", self.max_prompt_chars, self.max_model_len, self.max_chars_per_token)
        # one tokenizer copy per preparation thread: never the engine's (which decodes on its own
        # thread), never one shared by two threads (see the module docstring)
        self._tokenizers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(max(1, config.prep_workers)):
            self._tokenizers.put(copy.deepcopy(tok))
        if config.allowed_local_media_path is not None and not Path(config.allowed_local_media_path).is_dir():
            raise ValueError(f"--allowed-local-media-path {config.allowed_local_media_path}: not a directory")

    @contextmanager
    def _tokenizer(self) -> Iterator[Any]:
        """A tokenizer copy for this thread alone (waits only if every copy is in use, which the
        pool's size, one per preparation thread, prevents in the server)."""
        tok = self._tokenizers.get()
        try:
            yield tok
        finally:
            self._tokenizers.put(tok)

    def check_text_length(self, req: ChatRequest) -> None:
        """Refuse, before any tokenisation, text that cannot fit in the context (see the module
        docstring); O(number of parts)."""
        chars = sum(len(p[1]) for m in req.messages for p in m.parts if p[0] == "text")
        if chars > self.max_prompt_chars:
            least = math.ceil(chars / self.max_chars_per_token)
            raise bad_request(
                f"this model's maximum context length is {self.max_model_len} tokens; the messages have {chars:,} "
                f"characters of text, at least {least:,} tokens (no token of this model's tokenizer covers more than "
                f"{self.max_chars_per_token} characters); shorten the messages", param="messages",
                code="context_length_exceeded")

    # --- prompts ----------------------------------------------------------------------------------
    def conversation(self, req: ChatRequest) -> list[dict[str, str]]:
        """The request's messages as a LLaVA conversation (``from``/``value``), images as ``<image>``."""
        turns: list[dict[str, str]] = []
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        for i, m in enumerate(req.messages):
            text = "\n".join(IMAGE_TOKEN if p[0] == "image" else p[1] for p in m.parts)
            role = names[m.role]
            if role == "system" and any(t["from"] != "system" for t in turns):
                raise bad_request(f"messages[{i}]: a system message may only come before the conversation",
                                  param=f"messages[{i}].role", code="invalid_value")
            if turns and turns[-1]["from"] == role:
                turns[-1]["value"] += "\n" + text
            else:
                turns.append({"from": role, "value": text})
        if turns[-1]["from"] != "human":
            raise bad_request("the last message must be a user message (the server writes the assistant's reply)",
                              param="messages", code="invalid_value")
        if turns[0]["from"] == "gpt" or (turns[0]["from"] == "system" and len(turns) > 1 and turns[1]["from"] == "gpt"):
            raise bad_request("the conversation must start with a user message (after an optional system message)",
                              param="messages", code="invalid_value")
        return turns

    def prompt_ids(self, conv: list[dict[str, str]]) -> list[int]:
        """Ids of the conversation rendered by the template up to where the assistant's reply starts:
        the conversation is rendered with a placeholder reply, and everything before the reply's
        (trained-on) segments is kept. For one user turn this equals ``template.prompt(question)``."""
        with self._tokenizer() as tok:
            try:
                segs = self.template.segments(tok, conv + [{"from": "gpt", "value": "x"}])
            except TemplateError as e:
                raise bad_request(f"the messages do not fit the chat template {self.template.name!r}: {e}",
                                  param="messages", code="invalid_value") from None
            labelled = [i for i, s in enumerate(segs) if s.labelled]
            if not labelled:
                raise APIError(500, f"chat template {self.template.name!r} marks no reply", type="server_error")
            k = labelled[-1]
            while k > 0 and segs[k - 1].labelled:
                k -= 1
            return encode_segments(tok, segs[:k]).input_ids

    # --- requests -----------------------------------------------------------------------------------
    def prepare_chat(self, req: ChatRequest) -> GenRequest:
        """Prompt ids, images (sizes and limits first, then decoded and rendered) and lengths."""
        cfg = self.config
        if len(req.images) > cfg.max_images_per_request:
            raise bad_request(f"the request has {len(req.images)} images; at most {cfg.max_images_per_request} are "
                              "allowed per request", param="messages", code="too_many_images")
        self.check_text_length(req)  # before tokenising: a huge text is refused in microseconds
        ids = self.prompt_ids(self.conversation(req))
        n_placeholders = sum(1 for t in ids if t == self.model.image_token_id)
        if n_placeholders != len(req.images):
            raise bad_request(f"chat template {self.template.name!r} kept {n_placeholders} of the "
                              f"{len(req.images)} image placeholder(s)", param="messages", code="invalid_value")
        text_tokens = len(ids) - n_placeholders
        if text_tokens >= self.max_model_len:
            raise self._too_long(text_tokens, 0, req.max_tokens)
        sources = [(resolve_image_url(url, param, cfg.allowed_local_media_path), param) for url, param in req.images]
        # the request's budget, if any, over the model's plan options: counted here, before encoding,
        # through the model's own plan (a composed method's count is its parts', and its budget the
        # composed count's), and the images then rendered from that same plan
        budget = budget_options(req.max_visual_tokens)
        plans = [self._count_plan(checked_size(src, param, cfg.max_image_pixels), param, budget, req)
                 for src, param in sources]
        visual = sum(p.num_visual_tokens for p in plans)
        prompt = text_tokens + visual
        if prompt >= self.max_model_len or (req.max_tokens is not None and prompt + req.max_tokens > self.max_model_len):
            raise self._too_long(text_tokens, visual, req.max_tokens)
        images = [self._prepare(src, param, budget, req) for src, param in sources]
        left = self.max_model_len - prompt
        max_tokens = req.max_tokens if req.max_tokens is not None else min(left, cfg.default_max_tokens or left)
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                stop=req.stop, seed=req.seed)
        return GenRequest(input_ids=ids, images=images, params=params, prompt_tokens_est=prompt,
                          id=f"chatcmpl-{uuid.uuid4().hex}")

    def is_model_method(self, method: str | None) -> bool:
        """Whether ``method`` (a planner name, None = the model's) is planned as the served model
        plans: through its ``method_spec`` when it is a composed method (whose ``method`` is its
        views' planner, e.g. ``llava-next`` for NeXT's tiles through UHD's resampler)."""
        return method is None or method == self.model.config.method

    def plan_options(self, method: str, budget: int | None) -> dict[str, Any]:
        """The planner options for ``method``: the model's ``plan_options`` when it is the model's
        method (else the planner's defaults), with a request's ``budget`` as ``max_visual_tokens``.
        For the model's own method plan with :meth:`plan` instead: these options alone miss a
        composed method's parts (``method_spec``)."""
        options = dict(self.model.config.plan_options or {}) if self.is_model_method(method) else {}
        options.update(budget_options(budget))
        return options

    def plan(self, method: str | None, size: tuple[int, int], budget: int | None = None) -> Plan:
        """The plan of an image of ``size`` for ``method`` (None = the model's) within ``budget``:
        the model's own plan (:meth:`HiresLMM.plan`, the count it splices, a composed method's
        included) for the model's method, else the planner's plan of that preset with its
        defaults. A budget no plan fits raises :class:`BudgetError`."""
        if self.is_model_method(method):
            return self.model.plan(size, **budget_options(budget))
        return plan_image(method or self.model.config.method, size, **budget_options(budget))

    def plan_cost(self, method: str | None, plan: Plan) -> CostReport:
        """The cost of ``plan`` (from :meth:`plan` of the same ``method``): a composed model
        method's by its parts (:meth:`hires_lmm.parts.MethodSpec.cost_of`), else the planner's."""
        spec = method_spec_of(self.model.config.method_spec, self.model.config.plan_options or {}) \
            if self.is_model_method(method) else None
        return spec.cost_of(plan) if spec is not None else plan_cost(plan)

    def _budget_error(self, e: BudgetError, image_param: str, req: ChatRequest | PlanRequest) -> APIError:
        """400 for an image no plan fits within the budget (the request's, else the model's)."""
        if req.max_visual_tokens is not None:
            return bad_request(f"'{image_param}': {e}; raise '{req.budget_param}' or send a smaller image",
                               param=req.budget_param, code="invalid_value")
        return bad_request(f"'{image_param}': {e} (the model's configured budget); send a larger "
                           "'max_visual_tokens' or a smaller image", param=image_param, code="invalid_value")

    def _count_plan(self, size: tuple[int, int], param: str, budget: dict[str, Any], req: ChatRequest) -> Plan:
        """The plan with the token count the model will splice (a composed method's included)."""
        try:
            return self.model.plan(size, **budget)
        except BudgetError as e:
            raise self._budget_error(e, param, req) from None

    def _prepare(self, src: ImageBytesOrPath, param: str, budget: dict[str, Any], req: ChatRequest) -> ImageInput:
        """The image loaded (limits applied), planned as the model plans it (:meth:`HiresLMM.prepare_image`:
        its ``plan_options`` and ``method_spec``, the request's ``budget`` over them) and rendered;
        with ``--fast-decode`` planned from the header and decoded reduced."""
        cfg = self.config
        try:
            if cfg.fast_decode:
                try:
                    return self.model.prepare_image(src, fast=True, max_pixels=cfg.max_image_pixels, **budget)
                except ImageLoadError as e:
                    raise _load_error(e, param) from None
            return self.model.prepare_image(load_checked(src, param, cfg.max_image_pixels),
                                            max_pixels=cfg.max_image_pixels, **budget)
        except BudgetError as e:
            raise self._budget_error(e, param, req) from None

    def _too_long(self, text: int, visual: int, max_tokens: int | None) -> APIError:
        ask = f" + {max_tokens} completion tokens (max_tokens)" if max_tokens is not None else ""
        return bad_request(
            f"this model's maximum context length is {self.max_model_len} tokens; the request has "
            f"{text + visual} prompt tokens ({text} text + {visual} visual tokens from its image plans){ask}; "
            "shorten the messages, send fewer or smaller images, or lower max_tokens",
            param="messages", code="context_length_exceeded")

    def prepare_plan(self, req: PlanRequest, *, with_cost: bool = False) -> dict[str, Any]:
        """The plan JSON of the image (the model's method unless another is asked; within the
        request's ``max_visual_tokens`` when it sets one), and the overlay picture of
        :func:`hires_lmm.image.overlay.draw_plan` as a PNG data URL; with ``with_cost`` its
        :meth:`plan_cost` as ``cost``. The model's method (asked or not) is planned as the model
        plans it (:meth:`plan`: a composed method's count and budget are its parts'); another
        method by the planner, with its defaults."""
        cfg = self.config
        src = resolve_image_url(req.image, "image", cfg.allowed_local_media_path)
        size = checked_size(src, "image", cfg.max_image_pixels)
        method = req.method or self.model.config.method
        try:
            plan = self.plan(method, size, req.max_visual_tokens)
        except BudgetError as e:
            raise self._budget_error(e, "image", req) from None
        out: dict[str, Any] = {"object": "plan", "method": method, "model_method": self.model.config.method,
                               "plan": plan.to_json()}
        if with_cost:
            out["cost"] = self.plan_cost(method, plan).to_json()
        if req.overlay:
            from ..image.overlay import draw_plan

            img = load_checked(src, "image", cfg.max_image_pixels)
            with torch.inference_mode():
                pic = draw_plan(img, plan, width=req.overlay_width)
            buf = io.BytesIO()
            pic.save(buf, format="PNG", optimize=False)
            out["overlay"] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
            out["overlay_size"] = list(pic.size)
        return out

    def model_card(self) -> dict[str, Any]:
        """``/v1/models``' entry; a composed method's method file as ``method_spec`` (its ``method``
        is then its views' planner)."""
        card = {"id": self.config.served_model_name, "object": "model", "created": self.created,
                "owned_by": "hires-lmm", "method": self.model.config.method, "max_model_len": self.max_model_len,
                "chat_template": self.template.name}
        if self.model.config.method_spec:
            card["method_spec"] = dict(self.model.config.method_spec)
        return card


def budget_options(budget: int | None) -> dict[str, Any]:
    """A request's ``max_visual_tokens`` as plan options over the model's (none without one)."""
    return {} if budget is None else {"max_visual_tokens": budget}


def default_served_name(model_dir: str | os.PathLike) -> str:
    return Path(model_dir).resolve().name


__all__ = ["METHODS", "ServeConfig", "Service", "default_served_name", "max_chars_per_token", "resolve_template"]
