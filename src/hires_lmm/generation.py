"""What every decoding loop of hires-lmm shares: the sampler and the incremental stop matcher.

Two loops decode: :meth:`HiresLMM.generate` (transformers' ``GenerationMixin``: one batch, from
prefill to the last token) and the server's continuous-batching engine
(:mod:`hires_lmm.serve.engine`: rows join and leave every step). Both pick tokens with
:func:`sampling_processors` + :func:`sample_next` and end replies with :class:`StopMatcher`, so a
request gets the same reply from either:

* **Sampling** is transformers' own: ``TemperatureLogitsWarper`` then ``TopPLogitsWarper`` (the
  warpers ``GenerationMixin`` builds for ``do_sample=True, temperature=t, top_p=p, top_k=0``),
  softmax, one multinomial draw. :meth:`HiresLMM.generate` hands the same processors to
  ``GenerationMixin``; the engine applies them per row with the request's seeded generator.
* **Stop strings** are found on text decoded incrementally: each new token decodes a window of a
  few tokens (the last committed ones plus the new ones), not the whole reply again
  (:class:`IncrementalDecoder`). The final text is decoded once, in full, and cut at the first stop
  string, exactly as decoding everything and searching would.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import cast

import torch
from transformers import LogitsProcessorList, StoppingCriteria, TemperatureLogitsWarper, TopPLogitsWarper

REPLACEMENT = "\ufffd"


# --- sampling -------------------------------------------------------------------------------------
def sampling_processors(temperature: float, top_p: float = 1.0) -> LogitsProcessorList:
    """The logits processors of nucleus sampling at ``temperature`` (> 0) and ``top_p``.

    The very warpers ``GenerationMixin`` builds from a ``GenerationConfig``; an identity step
    (temperature 1, top_p 1) is left out, as transformers does.
    """
    if temperature <= 0:
        raise ValueError(f"sampling needs a temperature > 0, not {temperature}")
    procs = LogitsProcessorList()
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(temperature)))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(float(top_p)))
    return procs


def sample_next(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of ``logits`` (B, V) float32: the argmax when ``temperature`` is 0, else a
    draw from :func:`sampling_processors`' distribution (on the CPU, with ``generator``).

    Returns (B,) int64 on the CPU. Drawing on the CPU with the request's own generator makes a
    seeded reply independent of the device and of the other rows of a batch; with the same seed a
    one-row draw equals ``GenerationMixin``'s under ``torch.manual_seed(seed)`` on the CPU.
    """
    if temperature <= 0:
        return logits.argmax(-1).cpu()
    no_ids = cast(torch.LongTensor, logits.new_empty((logits.shape[0], 0), dtype=torch.long))  # warpers ignore input_ids
    scores = sampling_processors(temperature, top_p)(no_ids, logits.float())
    probs = torch.softmax(scores, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --- incremental decoding -------------------------------------------------------------------------
class IncrementalDecoder:
    """Token ids → text, decoding only a short window per token.

    The window runs from ``prefix`` (the start of the last committed piece) to the end: decoding
    ``ids[prefix:read]`` and ``ids[prefix:]`` and keeping the difference gives the new text with
    the context a tokenizer needs (a sentencepiece "▁" at the start of a decode, byte-level pieces
    of one character). A piece whose decoded text ends in U+FFFD (a character whose remaining bytes
    are still to come) is not committed until a later token completes it; :attr:`pending` shows it.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True) -> None:  # noqa: ANN001
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""        # committed text
        self.pending = ""     # decoded text after ``text`` that may still change (an incomplete character)
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token: int) -> str:
        """Add one token; returns the newly committed text ("" while a character is incomplete)."""
        self.ids.append(int(token))
        before = self._decode(self.ids[self._prefix:self._read]) if self._read > self._prefix else ""
        now = self._decode(self.ids[self._prefix:])
        if not now.startswith(before):  # a tokenizer that rewrites earlier text (clean-up of spaces)
            self.pending = now
            return ""
        new = now[len(before):]
        if new and not new.endswith(REPLACEMENT):
            self.text += new
            self.pending = ""
            self._prefix, self._read = self._read, len(self.ids)
            return new
        self.pending = new
        return ""

    def full(self) -> str:
        """The whole text decoded in one go (what decoding every id at once gives)."""
        return self._decode(self.ids)


class StopMatcher:
    """Stop strings over one reply, token by token; and the text that is safe to stream.

    ``push(token)`` returns True once any of ``stops`` appears in the decoded text (searched only
    where a stop string can have just completed); ``ready()`` returns the text not yet handed out
    that can no longer change: not a tail that could still become a stop string, not half a
    character, not U+FFFD right before either (a reply cut there drops it); ``finish()`` decodes the reply once and cuts it at the first stop string.

    ``lock`` (optional) is held around every use of the tokenizer (a fast tokenizer's Rust object
    must not be used from two threads at once).
    """

    def __init__(self, tokenizer, stops: Iterable[str] = (), *, lock: threading.Lock | None = None) -> None:  # noqa: ANN001
        self.stops = tuple(s for s in stops if s)
        self.decoder = IncrementalDecoder(tokenizer)
        self.lock = lock
        self.stopped = False
        self._longest = max((len(s) for s in self.stops), default=0)
        self._searched = 0  # text before this offset holds no stop string
        self._given = 0     # characters of committed text handed out by ready()

    @property
    def ids(self) -> list[int]:
        return self.decoder.ids

    def push(self, token: int) -> bool:
        with self.lock or nullcontext():
            self.decoder.push(token)
        if self.stops and not self.stopped:
            text = self.decoder.text + self.decoder.pending
            start = max(0, self._searched - self._longest + 1)
            window = text[start:]
            self.stopped = any(s in window for s in self.stops)
            self._searched = len(self.decoder.text)
        return self.stopped

    def ready(self) -> str:
        """Committed text not handed out yet, less a tail that is a proper prefix of a stop string."""
        text = self.decoder.text
        safe = len(text) - stop_holdback(text[-self._longest:] if self._longest else "", self.stops)
        # U+FFFD right before what is held back would end the reply if a stop string completes
        # there, and a reply never ends in a broken character (the server drops it): hold it too
        while safe > self._given and text[safe - 1] == REPLACEMENT:
            safe -= 1
        if safe <= self._given:
            return ""
        out, self._given = text[self._given:safe], safe
        return out

    def finish(self) -> str:
        """The reply: all its tokens decoded at once, cut at the first stop string."""
        with self.lock or nullcontext():
            text = self.decoder.full()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        return text[:cut] if cut >= 0 else text


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class StopStringCriteria(StoppingCriteria):
    """``GenerationMixin`` stopping criterion: one :class:`StopMatcher` per row.

    Called after every step with the sequences so far; reads each running row's newest token
    (rows that ended on one of ``end_ids``, then padded, are left alone). After ``generate``,
    ``matchers[i].finish()`` is row i's text cut at its stop string.
    """

    def __init__(self, tokenizer, stops: Sequence[str], batch_size: int, end_ids: Iterable[int] = ()) -> None:  # noqa: ANN001
        self.matchers = [StopMatcher(tokenizer, stops) for _ in range(batch_size)]
        self.end_ids = frozenset(int(t) for t in end_ids)
        self._ended = [False] * batch_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:  # noqa: ANN003
        last = input_ids[:, -1].tolist()
        done = []
        for i, (m, t) in enumerate(zip(self.matchers, last)):
            if not (m.stopped or self._ended[i]):
                if t in self.end_ids:
                    self._ended[i] = True
                else:
                    m.push(t)
            done.append(m.stopped)
        return cast(torch.BoolTensor, torch.tensor(done, dtype=torch.bool, device=input_ids.device))


__all__ = ["IncrementalDecoder", "StopMatcher", "StopStringCriteria", "sample_next", "sampling_processors",
           "stop_holdback"]
