"""Continuous batching: every running request decodes in ONE step loop on a dedicated thread.

The loop owns a left-padded batch KV cache (the layout :meth:`HiresLMM.generate` uses) and, per
row, the request's next-token logits, position and sampling state. Each turn of the loop:

1. **Admit.** Requests waiting in the queue join the running batch, up to ``max_batch`` rows and
   ``max_prefill_tokens`` prompt tokens per turn (one request is always admitted). When the batch
   is idle, the loop first waits ``batch_wait_s`` for more arrivals, so a burst is prefilled
   together. The joining group is prefilled in one call: :meth:`HiresLMM.build_inputs` encodes
   all its images together and splices them (left padding), one LLM forward fills a KV cache
   for the group, and that cache is merged into the batch cache by left-padding the shorter of
   the two along the sequence axis and concatenating along the batch axis.
2. **Sample.** One token per row from its logits, with the request's own temperature, top-p and
   seeded generator (greedy rows share one argmax), by the sampler ``HiresLMM.generate`` uses
   (:func:`hires_lmm.generation.sample_next`). EOS / the template's end-of-turn tokens, the
   request's stop strings and ``max_tokens`` end a row; each row's
   :class:`~hires_lmm.generation.StopMatcher` (the one ``generate`` uses) decodes only the new
   token's window, finds stop strings there and hands the request's asyncio queue (thread-safe)
   the text that can no longer change: not a tail that could still become a stop string, not an
   incomplete UTF-8 character. The reply's final text is decoded once, when it ends.
3. **Leave.** Finished and cancelled rows are removed from the cache (``index_select`` on the
   batch axis); leading columns that are padding in every remaining row are trimmed.
4. **Decode.** One LLM forward of the batch's last tokens (``(B, 1)``) with the attention mask
   and per-row positions, extending the cache by one column.

A row's text is exactly what ``HiresLMM.generate`` would return for the same prompt: the same
prompt ids, greedy or the same sampling rule, the same stop handling (a long prompt joining
later only changes other rows' left padding, which the attention mask hides).

The batch cache needs the LLM's cache to be a ``DynamicCache`` of plain full-attention layers
(Llama, Vicuna, Mistral/Qwen2 without sliding windows, ...); :meth:`Engine.check_model` refuses
others at start-up with a clear message. Failures are contained: a prefill that raises fails
only the joining requests; a decode step that raises fails the running rows and resets the
batch; the loop itself keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..compat import cache_kwargs, output_cache
from ..generation import StopMatcher, sample_next, stop_holdback
from ..model import HiresLMM, ImageInput
from .errors import APIError

log = logging.getLogger("hires_lmm.serve")


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(eq=False)
class GenRequest:
    """One request as the engine sees it; the async side reads its events with :meth:`events`."""

    input_ids: list[int]
    images: list[ImageInput]
    params: SamplingParams
    prompt_tokens_est: int  # text + visual tokens counted from the plans (an upper bound)
    id: str = ""
    # --- set by the engine ---
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generated: list[int] = field(default_factory=list)
    emitted: str = ""
    finished: bool = False
    cancelled: bool = False
    generator: torch.Generator | None = None
    matcher: StopMatcher | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _queue: asyncio.Queue | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._queue = loop, asyncio.Queue()

    def cancel(self) -> None:
        """The client went away: the engine drops the request at its next step."""
        self.cancelled = True

    def _emit(self, kind: str, payload: Any) -> None:
        if self._loop is None or self._queue is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: the server is going away
            pass

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """``("delta", text)`` ... then ``("done", {...})`` or ``("error", APIError)``."""
        assert self._queue is not None, "bind() the request to the event loop first"
        while True:
            kind, payload = await self._queue.get()
            yield kind, payload
            if kind != "delta":
                return


#: the older name of :func:`hires_lmm.generation.stop_holdback`
_stop_holdback = stop_holdback


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    extra = length - t.shape[dim]
    if extra <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - (dim % t.dim())) + [extra, 0]
    return F.pad(t, pad)


class Engine:
    """The step loop (see the module docstring).

    Args:
        model: the :class:`HiresLMM`, already on its device and in eval mode.
        stop_token_ids: ids that end a reply (EOS and the chat template's end-of-turn tokens).
        max_batch: most rows decoding together.
        max_prefill_tokens: most prompt tokens (text + visual) prefilled in one turn of the loop.
        batch_wait_s: how long an idle engine waits for more arrivals before prefilling.
        max_waiting: most requests queued (not yet running); more are answered 503.
        tokenizer_lock: held around every use of the engine's tokenizer (``model.tokenizer``). The
            server prepares requests on copies of its own (:class:`~.service.Service`), so nothing
            else waits on this lock; it guards a caller that shares the model's tokenizer.
    """

    def __init__(self, model: HiresLMM, *, stop_token_ids: Sequence[int], max_batch: int = 16,
                 max_prefill_tokens: int = 16384, batch_wait_s: float = 0.005, max_waiting: int = 256,
                 tokenizer_lock: threading.Lock | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model = model
        self.tokenizer = model.tokenizer
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids if t is not None)
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.batch_wait_s = batch_wait_s
        self.max_waiting = max_waiting
        self.tokenizer_lock = tokenizer_lock or threading.Lock()  # shared with whoever else tokenises
        self._cond = threading.Condition()
        self._waiting: deque[GenRequest] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # the batch (touched by the engine thread only)
        self._rows: list[GenRequest] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None      # (B, T) 1 = real position
        self._pos: torch.Tensor | None = None       # (B, 1) position of the next token
        self._logits: torch.Tensor | None = None    # (B, V) float32, next-token logits
        self._last: torch.Tensor | None = None      # (B,) the tokens just sampled
        self._keep_logits = self._supports_logits_to_keep()
        self.stats: dict[str, float] = {
            "requests_submitted": 0, "requests_finished": 0, "requests_failed": 0, "requests_cancelled": 0,
            "prefill_batches": 0, "decode_steps": 0, "tokens_generated": 0,
            "max_batch_size_seen": 0, "max_prefill_batch_seen": 0,
            "prefill_s": 0.0, "decode_s": 0.0, "sample_s": 0.0,  # time the engine thread spent in each
        }

    # --- life cycle -----------------------------------------------------------------------------
    def _supports_logits_to_keep(self) -> bool:
        import inspect

        try:
            return "logits_to_keep" in inspect.signature(self.model.llm.forward).parameters
        except (TypeError, ValueError):
            return False

    @torch.inference_mode()
    def check_model(self) -> None:
        """Run a one-token forward: warms the model up and checks that its KV cache can be merged
        and split by batch row (a ``DynamicCache`` of full-attention layers)."""
        from transformers.cache_utils import DynamicLayer

        tok = self.tokenizer
        t = tok.bos_token_id if tok.bos_token_id is not None else (tok.eos_token_id or 0)
        ids = torch.tensor([[int(t)]], device=self.model.device)
        out = self.model.llm(input_ids=ids, use_cache=True)
        cache = output_cache(out)
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
            raise RuntimeError(f"continuous batching needs a DynamicCache of full-attention layers; this LLM "
                               f"({type(self.model.llm).__name__}) uses {', '.join(kinds)}")

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hires-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still queued or running get a 503 error."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        err = APIError(503, "the server is shutting down", type="server_error", code="server_shutting_down")
        with self._cond:
            pending, self._waiting = list(self._waiting), deque()
        for r in pending + self._rows:
            self._fail(r, err)
        self._reset()

    # --- the async side -------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        """Queue a request (bound to the caller's event loop); 503 when the queue is full."""
        if req.params.seed is not None:
            req.generator = torch.Generator(device="cpu")
            req.generator.manual_seed(req.params.seed & 0xFFFF_FFFF_FFFF_FFFF)
        elif req.params.temperature > 0:
            req.generator = torch.Generator(device="cpu")
            req.generator.manual_seed(random.getrandbits(63))
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down", type="server_error", code="server_shutting_down")
            if len(self._waiting) >= self.max_waiting:
                raise APIError(503, f"the server is busy ({len(self._waiting)} requests waiting); retry later",
                               type="server_error", code="server_overloaded")
            self._waiting.append(req)
            self.stats["requests_submitted"] += 1
            self._cond.notify_all()

    def snapshot(self) -> dict[str, float]:
        with self._cond:
            waiting = len(self._waiting)
        out = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.stats.items()}
        return {**out, "running": len(self._rows), "waiting": waiting, "max_batch": self.max_batch}

    # --- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                group = self._admit()
                if group is None:
                    return
                try:
                    t0 = time.perf_counter()
                    if group:
                        self._prefill(group)
                    t1 = time.perf_counter()
                    if self._rows:
                        self._sample()
                    t2 = time.perf_counter()
                    if self._rows:
                        self._decode()
                    t3 = time.perf_counter()
                    self.stats["prefill_s"] += t1 - t0
                    self.stats["sample_s"] += t2 - t1
                    self.stats["decode_s"] += t3 - t2
                except Exception as e:  # noqa: BLE001 - the loop must outlive any one step
                    log.exception("engine step failed")
                    err = APIError(500, f"the server failed while generating: {type(e).__name__}: {e}",
                                   type="server_error", code="generation_failed")
                    for r in group + self._rows:
                        self._fail(r, err)
                    self._reset()

    def _admit(self) -> list[GenRequest] | None:
        with self._cond:
            if not self._rows:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                deadline = time.monotonic() + self.batch_wait_s
                while len(self._waiting) < self.max_batch and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            if self._stopping:
                return None
            group: list[GenRequest] = []
            tokens = 0
            while self._waiting and len(self._rows) + len(group) < self.max_batch:
                r = self._waiting[0]
                if r.cancelled:
                    self._waiting.popleft()
                    self.stats["requests_cancelled"] += 1
                    continue
                if group and tokens + r.prompt_tokens_est > self.max_prefill_tokens:
                    break
                self._waiting.popleft()
                group.append(r)
                tokens += r.prompt_tokens_est
            return group

    def _llm(self, **kw: Any) -> Any:
        return self.model.llm(use_cache=True, **kw)

    def _prefill(self, group: list[GenRequest]) -> None:
        model = self.model
        try:
            ids = [torch.tensor(r.input_ids, dtype=torch.long) for r in group]
            batch = model.build_inputs(ids, [r.images for r in group], padding_side="left")
            extra = {"logits_to_keep": 1} if self._keep_logits else {}
            out = self._llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, **extra)
            logits = out.logits[:, -1].float()
        except Exception as e:  # noqa: BLE001 - contained: only this group fails
            log.exception("prefill of %d request(s) failed", len(group))
            err = APIError(500, f"the model failed on this request: {type(e).__name__}: {e}", type="server_error",
                           code="generation_failed")
            for r in group:
                self._fail(r, err)
            return
        for r, n in zip(group, batch.attention_mask.sum(1).tolist()):
            r.prompt_tokens = int(n)
            r.images = []  # the views are in the cache now
        self._join(group, output_cache(out), batch.attention_mask, batch.position_ids[:, -1:] + 1, logits)
        self.stats["prefill_batches"] += 1
        self.stats["max_prefill_batch_seen"] = max(self.stats["max_prefill_batch_seen"], len(group))
        self.stats["max_batch_size_seen"] = max(self.stats["max_batch_size_seen"], len(self._rows))

    def _join(self, group: list[GenRequest], cache: Any, mask: torch.Tensor, pos: torch.Tensor,
              logits: torch.Tensor) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask, self._pos, self._logits = list(group), cache, mask, pos, logits
            return
        assert self._mask is not None and self._pos is not None and self._logits is not None
        T = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, T, -2), _pad_left(new.keys, T, -2)])
            old.values = torch.cat([_pad_left(old.values, T, -2), _pad_left(new.values, T, -2)])
        self._mask = torch.cat([_pad_left(self._mask, T, 1), _pad_left(mask, T, 1)])
        self._pos = torch.cat([self._pos, pos])
        self._logits = torch.cat([self._logits, logits])
        self._rows += group

    def _sample(self) -> None:
        assert self._logits is not None
        logits = self._logits
        greedy = logits.argmax(-1).tolist()
        picked: list[int] = []
        for i, r in enumerate(self._rows):
            if r.cancelled:
                r.finished = True
                self.stats["requests_cancelled"] += 1
                picked.append(0)
                continue
            p = r.params
            if p.temperature <= 0:
                t = greedy[i]
            else:
                t = int(sample_next(logits[i:i + 1], p.temperature, p.top_p, r.generator)[0])
            picked.append(t)
            self._advance(r, t)
        self.stats["tokens_generated"] += len(picked)
        self._last = torch.tensor(picked, dtype=torch.long)
        self._drop_finished()

    def _advance(self, r: GenRequest, t: int) -> None:
        """Record token ``t`` for row ``r``: stop tokens, stop strings, max_tokens, and the text to send."""
        r.completion_tokens += 1
        m = r.matcher
        if m is None:  # the request's first token
            m = r.matcher = StopMatcher(self.tokenizer, r.params.stop, lock=self.tokenizer_lock)
        reason = None
        if t in self.stop_token_ids:
            reason = "stop"
        else:
            r.generated.append(t)
            if m.push(t):
                reason = "stop"
            elif r.completion_tokens >= r.params.max_tokens:
                reason = "length"
        if reason is None:
            delta = m.ready()  # never half a character, never a tail that may become a stop string
            if delta:
                r._emit("delta", delta)
                r.emitted += delta
            return
        # the reply ends here (max_tokens, a stop token or string): decoded once in full and cut at
        # the first stop string; a character still incomplete will never be completed, so it is
        # dropped rather than sent as U+FFFD (a byte sequence that is invalid in the middle of the
        # text is sent as U+FFFD as before)
        text = m.finish().rstrip("\ufffd")
        if len(text) > len(r.emitted) and text.startswith(r.emitted):
            r._emit("delta", text[len(r.emitted):])
        r.finished = True
        self.stats["requests_finished"] += 1
        r._emit("done", {"text": text, "finish_reason": reason, "prompt_tokens": r.prompt_tokens,
                         "completion_tokens": r.completion_tokens})

    def _fail(self, r: GenRequest, err: APIError) -> None:
        if r.finished:
            return
        r.finished = True
        self.stats["requests_failed"] += 1
        r._emit("error", err)

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not r.finished]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset()
            return
        assert self._mask is not None and self._pos is not None and self._last is not None
        idx = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, idx)
        cols = mask.any(0).nonzero()
        first = int(cols[0]) if len(cols) else 0  # leading columns that are padding in every row
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, idx.to(layer.keys.device))[:, :, first:]
            layer.values = layer.values.index_select(0, idx.to(layer.values.device))[:, :, first:]
        self._mask = mask[:, first:]
        self._pos = self._pos.index_select(0, idx)
        self._last = self._last[keep]
        self._rows = [self._rows[i] for i in keep]
        self._logits = None

    def _decode(self) -> None:
        assert self._mask is not None and self._pos is not None and self._last is not None
        try:
            dev = self.model.device
            mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
            out = self._llm(input_ids=self._last[:, None].to(dev), attention_mask=mask, position_ids=self._pos,
                            **cache_kwargs(self.model.llm, self._cache))
            self._cache, self._mask = output_cache(out), mask
            self._logits = out.logits[:, -1].float()
            self._pos = self._pos + 1
            self.stats["decode_steps"] += 1
        except Exception as e:  # noqa: BLE001 - contained: the running rows fail, the loop goes on
            log.exception("decode step over %d row(s) failed", len(self._rows))
            err = APIError(500, f"the model failed while decoding: {type(e).__name__}: {e}", type="server_error",
                           code="generation_failed")
            for r in self._rows:
                self._fail(r, err)
            self._reset()

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._pos, self._logits, self._last = [], None, None, None, None, None
