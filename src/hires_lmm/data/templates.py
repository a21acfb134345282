"""Chat templates: a LLaVA conversation → ``(input_ids, labels)`` with labels on the replies only.

A template renders a conversation as a list of :class:`Segment` s (text, or one special token),
each marked as trained on or not. The ids are built segment by segment, so every label lines up
with its token by construction; ``<image>`` is always the tokenizer's single ``<image>`` token.

Why not tokenise the whole string and count tokens per part, as LLaVA's ``preprocess_v1`` does?
Counting needs the parts to tokenise the same alone as in context, and when they do not (a
sentencepiece tokenizer's leading "▁", ``legacy`` tokenizers, a merge across a boundary) LLaVA
prints "tokenization mismatch" and silently trains on nothing for that sample. Here a text segment
gets the ids its text adds to the text before it (since the last special token, which tokenizers
always split on, behind an *anchor* special token when not at the start of the string), so it is
tokenised in the context it has in the whole string; :func:`check_alignment` then compares the ids
with the whole rendered string tokenised in one go and raises, naming the record, wherever a token
straddles a boundary.

Templates (:func:`get_template`):

* ``plain``: caption pretraining, ``<image>`` + caption + ``"\\n"`` (LLaVA ``preprocess_plain``:
  the human turn is replaced by its image placeholder(s); the caption and "\\n" are trained on).
* ``vicuna_v1``: LLaVA-1.5 (``conv_vicuna_v1``): ``SYSTEM USER: q ASSISTANT: a</s>USER: ...``.
* ``llama3``: Llama-3 header tokens, contents trimmed as Meta's template does, LLaVA-NeXT's system
  prompt by default.
* ``chatml``: Qwen2 ``<|im_start|>role\\n...<|im_end|>\\n``, Qwen's default system prompt.
* ``tokenizer``: the tokenizer's own ``chat_template``; the assistant spans are found by rendering
  conversation prefixes (each reply = what rendering through it adds after the generation prompt).

Labels are ``-100`` everywhere except the assistant replies and their end-of-turn token.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from transformers import PreTrainedTokenizerBase

from ..text import IMAGE_TOKEN

IGNORE_INDEX = -100

#: The roles of LLaVA's conversation format.
ROLES = ("human", "gpt", "system")

#: ``conv_vicuna_v1`` in haotian-liu/LLaVA (what ``--version v1`` trains LLaVA-1.5 with).
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
#: ``preprocess_llama3`` in LLaVA-NeXT.
LLAMA3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                 "content that the user provides, and assist the user with a variety of tasks using natural language.")
#: ``preprocess_qwen`` in LLaVA-NeXT and Qwen2's own template.
CHATML_SYSTEM = "You are a helpful assistant."

#: Special tokens that end an assistant turn in common chat templates (used by ``tokenizer``).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>")

Conversation = Sequence[Mapping[str, Any]]


class TemplateError(ValueError):
    """A conversation cannot be rendered by a template (roles out of order, missing text, ...)."""


class MissingSpecialTokenError(TemplateError):
    """The tokenizer lacks a special token the template needs as one token."""


class TokenizationMismatchError(ValueError):
    """Segment-wise ids differ from the rendered text tokenised in one go (labels untrustworthy)."""


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered conversation.

    Attributes:
        text: the text (for a special segment, the token's string).
        labelled: trained on (label = the token id) or not (label = -100).
        special: one token of the tokenizer's vocabulary, looked up by string, never split.
    """

    text: str
    labelled: bool = False
    special: bool = False


@dataclass
class Encoding:
    """A tokenised conversation.

    Attributes:
        input_ids: (T,) token ids, the BOS included when ``bos`` is True.
        labels: (T,) ``input_ids`` where trained on, -100 elsewhere.
        text: the rendered text, *without* the BOS the tokenizer adds itself (so that
            ``tokenizer(text)`` with its special tokens reproduces ``input_ids``).
        bos: whether ``input_ids[0]`` is a BOS added outside ``text``.
        targets: the text of each trained-on run, in order (each reply with its end marker).
    """

    input_ids: list[int]
    labels: list[int]
    text: str
    bos: bool
    targets: list[str] = field(default_factory=list)


# --- per-tokenizer facts, cached (a tokenizer that grows is re-examined) --------------------------

@dataclass
class _TokInfo:
    size: int
    auto_bos: bool
    anchor: tuple[str, int] | None
    single: dict[str, int | None] = field(default_factory=dict)


_INFO: weakref.WeakKeyDictionary[Any, _TokInfo] = weakref.WeakKeyDictionary()


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _info(tokenizer: PreTrainedTokenizerBase) -> _TokInfo:
    size = len(tokenizer)
    try:
        info = _INFO.get(tokenizer)
    except TypeError:  # not weak-referenceable: no cache
        info = None
    if info is not None and info.size == size:
        return info
    bos = tokenizer.bos_token_id
    with_sp = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    without = _ids(tokenizer, "a")
    auto_bos = bos is not None and len(with_sp) > len(without) and with_sp[0] == bos
    anchor = None
    # a special token the tokenizer splits on: text after it is tokenised as "not at the start"
    for tok in (IMAGE_TOKEN, tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token, tokenizer.unk_token,
                *getattr(tokenizer, "all_special_tokens", [])):
        if not isinstance(tok, str) or not tok:
            continue
        # transformers types the result as int | list[int]; for one token (a str) it is an int or None
        tid = cast("int | None", tokenizer.convert_tokens_to_ids(tok))
        if tid is None:
            continue
        added = getattr(tokenizer, "added_tokens_decoder", {}).get(tid)
        if getattr(added, "rstrip", False):  # it would eat the whitespace that starts the text after it
            continue
        if _ids(tokenizer, tok) == [tid] and _ids(tokenizer, tok + "a")[:1] == [tid]:
            anchor = (tok, int(tid))
            break
    info = _TokInfo(size, auto_bos, anchor)
    try:
        _INFO[tokenizer] = info
    except TypeError:
        pass
    return info


def single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """Id of ``token`` when the tokenizer turns that string into exactly that one token, else None."""
    info = _info(tokenizer)
    if token not in info.single:
        tid = cast("int | None", tokenizer.convert_tokens_to_ids(token))  # a str: int or None, as above
        info.single[token] = int(tid) if tid is not None and _ids(tokenizer, token) == [tid] else None
    return info.single[token]


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer(text)`` (special tokens on) starts with BOS: Llama/Vicuna and Llama-3 do,
    Qwen2 and the project's byte tokenizer do not. The default for ``add_bos`` everywhere, so that
    training ids match what ``HiresLMM.generate`` feeds at inference."""
    return _info(tokenizer).auto_bos


# --- the segment encoder ---------------------------------------------------------------------------

def _split_images(segments: Sequence[Segment]) -> list[Segment]:
    """``<image>`` inside text → its own special segment; adjacent text of equal label merged (fewer
    boundaries, fewer chances for a tokenizer to tokenise across one differently); empty text dropped."""
    out: list[Segment] = []
    buf: list[str] = []
    buf_lab = False

    def flush() -> None:
        if buf:
            out.append(Segment("".join(buf), buf_lab))
            buf.clear()

    for s in segments:
        if s.special:
            flush()
            out.append(s)
            continue
        for k, piece in enumerate(s.text.split(IMAGE_TOKEN) if IMAGE_TOKEN in s.text else (s.text,)):
            if k:
                flush()
                out.append(Segment(IMAGE_TOKEN, s.labelled, special=True))
            if piece:
                if buf and buf_lab != s.labelled:
                    flush()
                buf.append(piece)
                buf_lab = s.labelled
    flush()
    return out


def _encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        # one call into the Rust tokenizer for all segments of a conversation
        return [list(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [_ids(tokenizer, t) for t in texts]


@dataclass
class _Plan:
    """What encoding a conversation needs: its segments, text, BOS, and the texts to tokenise."""

    segs: list[Segment]
    text: str
    bos: bool
    jobs: dict[int, tuple[str, str]]  # text segment index → (its context, context + its text)

    def texts(self) -> list[str]:
        return [t for pair in self.jobs.values() for t in pair if t]


def _plan(tokenizer: PreTrainedTokenizerBase, segments: Sequence[Segment], add_bos: bool | None) -> _Plan:
    info = _info(tokenizer)
    segs = _split_images(segments)
    text = "".join(s.text for s in segs)
    bos = info.auto_bos if add_bos is None else bool(add_bos)
    bos_tok = tokenizer.bos_token
    if bos and (tokenizer.bos_token_id is None or (bos_tok and text.startswith(bos_tok))):
        bos = False  # no BOS, or the template rendered it already: never two
    # Each text segment is encoded in the context it has in the whole string: the text since the
    # last special token (after an anchor special token when there is one, so that "not at the
    # start" behaviour matches), then the context's own ids are removed. Special tokens always
    # split, so this reproduces tokenising the whole string unless a token straddles a boundary.
    jobs: dict[int, tuple[str, str]] = {}
    context, lead = "", ""
    for k, s in enumerate(segs):
        if s.special:
            if info.anchor is None:
                raise TemplateError("the tokenizer has no special token to anchor text segments on")
            context, lead = "", info.anchor[0]
        else:
            jobs[k] = (lead + context, lead + context + s.text)
            context += s.text
    return _Plan(segs, text, bos, jobs)


def _assemble(tokenizer: PreTrainedTokenizerBase, plan: _Plan, encoded: Mapping[str, list[int]]) -> Encoding:
    ids: list[int] = [int(tokenizer.bos_token_id)] if plan.bos else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    targets: list[str] = []
    for k, s in enumerate(plan.segs):
        if s.special:
            tid = single_token_id(tokenizer, s.text)
            if tid is None:
                hint = ("call hires_lmm.text.ensure_image_token(tokenizer) (HiresLMM does) "
                        if s.text == IMAGE_TOKEN else "call template.add_special_tokens(tokenizer) and resize the embeddings, ")
                raise MissingSpecialTokenError(f"the tokenizer has no single token {s.text!r}; {hint}or use a tokenizer that has it")
            seg_ids = [tid]
        else:
            before, through = (encoded[t] if t else [] for t in plan.jobs[k])
            # when ``before`` is not a prefix of ``through`` a token straddles the boundary: the
            # remainder below then makes the ids differ from the whole text, which check_alignment reports
            seg_ids = through[len(before):]
        ids += seg_ids
        labels += seg_ids if s.labelled else [IGNORE_INDEX] * len(seg_ids)
        if s.labelled:  # one target per run of labelled segments: a reply and its end marker
            if k and plan.segs[k - 1].labelled:
                targets[-1] += s.text
            else:
                targets.append(s.text)
    return Encoding(ids, labels, plan.text, plan.bos, targets)


def encode_segments(tokenizer: PreTrainedTokenizerBase, segments: Sequence[Segment], *,
                    add_bos: bool | None = None) -> Encoding:
    """Token ids and labels of ``segments``, built segment by segment.

    A text segment's ids are those its text adds to the text before it since the last special
    token (encoded after an anchor special token when that text does not start the string, so a
    sentencepiece "▁" or a ``legacy`` prefix behaves as in the whole string). Special segments are
    looked up as single tokens of the tokenizer. The result equals tokenising the whole text
    unless a token straddles a segment boundary, which :func:`check_alignment` detects.

    Raises:
        MissingSpecialTokenError: a special segment (``<image>``, ``<|im_start|>``, ...) is not one
            token of this tokenizer.
    """
    plan = _plan(tokenizer, segments, add_bos)
    texts = list(dict.fromkeys(plan.texts()))
    return _assemble(tokenizer, plan, dict(zip(texts, _encode_texts(tokenizer, texts))))


def check_alignment(tokenizer: PreTrainedTokenizerBase, input_ids: Sequence[int] | Any, text: str, *,
                    bos: bool = False, labels: Sequence[int] | Any | None = None, record_id: str | None = None,
                    source: str | None = None, whole: Sequence[int] | None = None) -> None:
    """Raise :class:`TokenizationMismatchError` unless ``input_ids`` equal ``text`` tokenised in one
    go (after a BOS when ``bos``), and ``labels`` (when given) has the same length.

    This is LLaVA's "tokenization mismatch" made loud: where a tokenizer tokenises across a
    segment boundary differently from the segments alone, the segment labels cannot be trusted.
    The message names the record and shows the tokens where the two first differ. ``whole``:
    ``text`` already tokenised (no special tokens added), to save tokenising it again.
    """
    ids = input_ids.tolist() if hasattr(input_ids, "tolist") else list(input_ids)
    where = f"record {record_id!r}" if record_id is not None else "conversation"
    if source:
        where += f" ({source})"
    if labels is not None:
        n = len(labels.tolist() if hasattr(labels, "tolist") else labels)
        if n != len(ids):
            raise TokenizationMismatchError(f"{where}: {len(ids)} input ids but {n} labels")
    expected = ([int(tokenizer.bos_token_id)] if bos else []) + (list(whole) if whole is not None else _ids(tokenizer, text))
    if ids == expected:
        return
    k = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), len(expected)))
    lo = max(0, k - 3)
    near = tokenizer.decode(ids[lo:k + 3])
    raise TokenizationMismatchError(
        f"{where}: tokenization mismatch at token {k} of {len(ids)} (whole text: {len(expected)} tokens): "
        f"segment-wise {tokenizer.convert_ids_to_tokens(ids[lo:k + 3])} vs whole text "
        f"{tokenizer.convert_ids_to_tokens(expected[lo:k + 3])} near {near!r}: a token spans a template "
        "boundary here (or the tokenizer treats a boundary differently), so the labels cannot be trusted "
        "(change the text or the template)")


# --- conversations -------------------------------------------------------------------------------

def split_conversation(conversations: Conversation) -> tuple[str | None, list[tuple[str, str]]]:
    """``(system, [(role, text), ...])`` with roles alternating human, gpt, human, ...

    A ``system`` turn may only come first. Raises :class:`TemplateError` otherwise.
    """
    if not isinstance(conversations, Sequence) or isinstance(conversations, (str, bytes)) or not conversations:
        raise TemplateError("the conversation is empty or not a list of turns")
    system: str | None = None
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping):
            raise TemplateError(f"turn {i} is not an object with 'from' and 'value'")
        role, value = turn.get("from"), turn.get("value")
        if role not in ROLES:
            raise TemplateError(f"turn {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(value, str):
            raise TemplateError(f"turn {i} ({role}): 'value' is {type(value).__name__}, not a string")
        if role == "system":
            if i != 0:
                raise TemplateError(f"turn {i}: a system turn may only come first")
            system = value
            continue
        expected = "human" if len(turns) % 2 == 0 else "gpt"
        if role != expected:
            raise TemplateError(f"turn {i}: expected a {expected} turn, got {role} (turns must alternate, human first)")
        turns.append((role, value))
    if not turns:
        raise TemplateError("the conversation has no human turn")
    return system, turns


# --- templates -----------------------------------------------------------------------------------

class ChatTemplate:
    """A chat format. Subclasses implement :meth:`segments` and :meth:`prompt_segments`."""

    name: str = ""
    #: strings that end a reply at generation time
    stop_strings: tuple[str, ...] = ()
    #: special tokens that must be single tokens of the tokenizer (besides ``<image>``)
    special_tokens: tuple[str, ...] = ()
    default_system: str | None = None

    def segments(self, tokenizer: PreTrainedTokenizerBase, conversations: Conversation) -> list[Segment]:
        raise NotImplementedError

    def prompt_segments(self, tokenizer: PreTrainedTokenizerBase, question: str, system: str | None) -> list[Segment]:
        raise NotImplementedError

    # --- public API ---
    def missing_special_tokens(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The template's special tokens this tokenizer does not have as single tokens."""
        return [t for t in self.special_tokens if single_token_id(tokenizer, t) is None]

    def add_special_tokens(self, tokenizer: PreTrainedTokenizerBase) -> int:
        """Add the missing special tokens to ``tokenizer`` (as special tokens); returns how many were
        added: resize the LLM's embeddings after a non-zero answer. Never done implicitly."""
        missing = self.missing_special_tokens(tokenizer)
        return tokenizer.add_tokens(missing, special_tokens=True) if missing else 0

    def _require(self, tokenizer: PreTrainedTokenizerBase) -> None:
        missing = self.missing_special_tokens(tokenizer)
        if missing:
            raise MissingSpecialTokenError(
                f"template {self.name!r} needs the special token(s) {missing} which this tokenizer lacks "
                f"(vocabulary of {len(tokenizer)}); use the model's own tokenizer, or call "
                f"get_template({self.name!r}).add_special_tokens(tokenizer) and resize the LLM's embeddings")

    def encode_full(self, tokenizer: PreTrainedTokenizerBase, conversations: Conversation, *,
                    add_bos: bool | None = None) -> Encoding:
        """The :class:`Encoding` (ids, labels, rendered text, targets) of a conversation.

        ``add_bos=None`` adds BOS when the tokenizer does so itself (:func:`tokenizer_adds_bos`).
        """
        self._require(tokenizer)
        return encode_segments(tokenizer, self.segments(tokenizer, conversations), add_bos=add_bos)

    def encode_many(self, tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Conversation], *,
                    add_bos: bool | None = None, check: bool = True) -> list[Encoding | Exception]:
        """:meth:`encode_full` of many conversations with one call into the tokenizer (the Rust
        backend tokenises the batch in parallel): per conversation its :class:`Encoding`, or the
        :class:`TemplateError` / :class:`TokenizationMismatchError` (with ``check``) it raised.
        A template special token missing from the tokenizer raises at once."""
        self._require(tokenizer)
        plans: list[_Plan | Exception] = []
        for conv in conversations:
            try:
                plans.append(_plan(tokenizer, self.segments(tokenizer, conv), add_bos))
            except TemplateError as e:
                plans.append(e)
        texts = list(dict.fromkeys(t for p in plans if isinstance(p, _Plan)
                                   for t in p.texts() + ([p.text] if check and p.text else [])))
        encoded = dict(zip(texts, _encode_texts(tokenizer, texts)))
        out: list[Encoding | Exception] = []
        for p in plans:
            if isinstance(p, Exception):
                out.append(p)
                continue
            try:
                enc = _assemble(tokenizer, p, encoded)
                if check:
                    check_alignment(tokenizer, enc.input_ids, enc.text, bos=enc.bos, labels=enc.labels,
                                    whole=encoded.get(enc.text, []))
                out.append(enc)
            except (TemplateError, TokenizationMismatchError) as e:
                out.append(e)
        return out

    def encode(self, tokenizer: PreTrainedTokenizerBase, conversations: Conversation, *,
               add_bos: bool | None = None) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)``, both of length T; labels -100 except on the replies and their
        end-of-turn token. ``conversations``: ``[{"from": "human"|"gpt"|"system", "value": str}]``."""
        enc = self.encode_full(tokenizer, conversations, add_bos=add_bos)
        return enc.input_ids, enc.labels

    def render(self, tokenizer: PreTrainedTokenizerBase, conversations: Conversation) -> str:
        """The rendered text (without a BOS the tokenizer adds itself)."""
        self._require(tokenizer)
        return "".join(s.text for s in self.segments(tokenizer, conversations))

    def prompt(self, tokenizer: PreTrainedTokenizerBase, question: str, system: str | None = None, *,
               add_bos: bool | None = None) -> list[int]:
        """Ids of the generation prompt for one question, ending where the assistant's reply starts."""
        self._require(tokenizer)
        return encode_segments(tokenizer, self.prompt_segments(tokenizer, question, system), add_bos=add_bos).input_ids

    def prompt_text(self, tokenizer: PreTrainedTokenizerBase, question: str, system: str | None = None) -> str:
        """The generation prompt as text (for ``HiresLMM.generate``, which adds the BOS itself)."""
        self._require(tokenizer)
        return "".join(s.text for s in self.prompt_segments(tokenizer, question, system))

    def stop_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Ids that end generation: EOS and the template's single-token stop strings."""
        out = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for s in self.stop_strings:
            tid = single_token_id(tokenizer, s)
            if tid is not None and tid not in out:
                out.append(tid)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _eos(tokenizer: PreTrainedTokenizerBase) -> str:
    if not tokenizer.eos_token:
        raise MissingSpecialTokenError("the tokenizer has no EOS token, which ends every reply")
    return tokenizer.eos_token


class PlainTemplate(ChatTemplate):
    """Caption pretraining (LLaVA ``preprocess_plain``): ``<image>`` + caption + ``"\\n"``.

    The human turn is replaced by just its ``<image>`` placeholder(s) (LLaVA asserts exactly one;
    a text-only pair keeps none); caption and "\\n" are trained on.
    """

    name = "plain"
    stop_strings = ("\n",)

    def segments(self, tokenizer: PreTrainedTokenizerBase, conversations: Conversation) -> list[Segment]:
        system, turns = split_conversation(conversations)
        if system is not None or len(turns) != 2:
            raise TemplateError(f"the plain template takes one human turn and one gpt turn, got {len(conversations)} turns")
        return [Segment(IMAGE_TOKEN * turns[0][1].count(IMAGE_TOKEN)), Segment(turns[1][1] + "\n", labelled=True)]

    def prompt_segments(self, tokenizer, question, system):
        return [Segment(IMAGE_TOKEN * question.count(IMAGE_TOKEN))]


class VicunaV1Template(ChatTemplate):
    """LLaVA-1.5's ``conv_vicuna_v1`` (``SeparatorStyle.TWO``, seps " " and EOS).

    ``SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>``. The trained part of a turn is
    " a</s>": the space after "ASSISTANT:" belongs to the reply because tokenizers glue it to the
    next word ("▁a", "Ġa"). An empty reply renders "ASSISTANT:</s>" (LLaVA would drop the EOS).
    """

    name = "vicuna_v1"
    stop_strings = ("</s>",)
    default_system = VICUNA_SYSTEM

    def _head(self, system: str | None) -> list[Segment]:
        return [Segment((self.default_system if system is None else system) + " ")]

    def segments(self, tokenizer, conversations):
        system, turns = split_conversation(conversations)
        eos = _eos(tokenizer)
        segs = self._head(system)
        for role, value in turns:
            if role == "human":
                segs.append(Segment(f"USER: {value} "))
            else:
                segs.append(Segment("ASSISTANT:"))
                if value:
                    segs.append(Segment(" " + value, labelled=True))
                segs.append(Segment(eos, labelled=True, special=True))
        return segs

    def prompt_segments(self, tokenizer, question, system):
        return self._head(system) + [Segment(f"USER: {question} ASSISTANT:")]


class Llama3Template(ChatTemplate):
    """Llama-3 instruct: ``<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``.

    Contents are trimmed as in Meta's template (``message['content'] | trim``); BOS
    (``<|begin_of_text|>``) comes from ``add_bos``. The reply and its ``<|eot_id|>`` are trained on.
    """

    name = "llama3"
    stop_strings = ("<|eot_id|>",)
    special_tokens = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    default_system = LLAMA3_SYSTEM

    @staticmethod
    def _header(role: str) -> list[Segment]:
        return [Segment("<|start_header_id|>", special=True), Segment(role),
                Segment("<|end_header_id|>", special=True), Segment("\n\n")]

    def _system(self, system: str | None) -> list[Segment]:
        system = self.default_system if system is None else system
        if not system:
            return []
        return self._header("system") + [Segment(system.strip()), Segment("<|eot_id|>", special=True)]

    def segments(self, tokenizer, conversations):
        system, turns = split_conversation(conversations)
        segs = self._system(system)
        for role, value in turns:
            if role == "human":
                segs += self._header("user") + [Segment(value.strip()), Segment("<|eot_id|>", special=True)]
            else:
                segs += self._header("assistant") + [Segment(value.strip(), labelled=True),
                                                     Segment("<|eot_id|>", labelled=True, special=True)]
        return segs

    def prompt_segments(self, tokenizer, question, system):
        return (self._system(system) + self._header("user")
                + [Segment(question.strip()), Segment("<|eot_id|>", special=True)] + self._header("assistant"))


class ChatMLTemplate(ChatTemplate):
    """Qwen2's ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n``; contents kept as they are.

    The reply and its ``<|im_end|>`` are trained on, the "\\n" after it is not.
    """

    name = "chatml"
    stop_strings = ("<|im_end|>",)
    special_tokens = ("<|im_start|>", "<|im_end|>")
    default_system = CHATML_SYSTEM

    @staticmethod
    def _turn(role: str, value: str) -> list[Segment]:
        return [Segment("<|im_start|>", special=True), Segment(f"{role}\n{value}"),
                Segment("<|im_end|>", special=True), Segment("\n")]

    def _system(self, system: str | None) -> list[Segment]:
        system = self.default_system if system is None else system
        return self._turn("system", system) if system else []

    def segments(self, tokenizer, conversations):
        system, turns = split_conversation(conversations)
        segs = self._system(system)
        for role, value in turns:
            if role == "human":
                segs += self._turn("user", value)
            else:
                segs += [Segment("<|im_start|>", special=True), Segment("assistant\n"), Segment(value, labelled=True),
                         Segment("<|im_end|>", labelled=True, special=True), Segment("\n")]
        return segs

    def prompt_segments(self, tokenizer, question, system):
        return self._system(system) + self._turn("user", question) + [
            Segment("<|im_start|>", special=True), Segment("assistant\n")]


def _plain_added_token(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    """Whether ``token`` is an added token that strips no neighbouring whitespace (so encoding the
    text around it apart from it changes nothing)."""
    tid = single_token_id(tokenizer, token)
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(tid) if tid is not None else None
    return added is not None and not getattr(added, "lstrip", False) and not getattr(added, "rstrip", False)


class TokenizerTemplate(ChatTemplate):
    """The tokenizer's own ``chat_template`` (``apply_chat_template``).

    Each reply's span is ``render(messages[:i+1])`` minus ``render(messages[:i],
    add_generation_prompt=True)``; both must be prefixes of the whole rendering (else a clear
    error: the template does not render incrementally). Inside the span the text up to the first
    end-of-turn marker after the reply (EOS, ``<|im_end|>``, ``<|eot_id|>``, ...) is trained on;
    what follows it (e.g. ChatML's "\\n") is not.
    """

    name = "tokenizer"

    @staticmethod
    def _messages(conversations: Conversation) -> list[dict[str, str]]:
        system, turns = split_conversation(conversations)
        msgs = [{"role": "system", "content": system}] if system is not None else []
        return msgs + [{"role": "user" if r == "human" else "assistant", "content": v} for r, v in turns]

    @staticmethod
    def _render(tokenizer, messages, generation: bool = False) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("the tokenizer has no chat_template; pick a named template instead")
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        if not isinstance(out, str):
            raise TemplateError(f"apply_chat_template returned {type(out).__name__}, not text")
        return out

    @staticmethod
    def _end_markers(tokenizer) -> list[str]:
        cands = [tokenizer.eos_token, *END_OF_TURN_TOKENS]
        return [t for t in dict.fromkeys(cands) if t and single_token_id(tokenizer, t) is not None]

    def segments(self, tokenizer, conversations):
        msgs = self._messages(conversations)
        full = self._render(tokenizer, msgs)
        markers = self._end_markers(tokenizer)
        segs: list[Segment] = []
        pos = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self._render(tokenizer, msgs[:i], generation=True)
            through = self._render(tokenizer, msgs[: i + 1])
            if not (through.startswith(before) and full.startswith(through) and len(before) >= pos):
                raise TemplateError(
                    f"the tokenizer's chat template does not render turn {i} incrementally (a prefix of the "
                    "conversation does not render as a prefix of the whole); use a named template")
            span = through[len(before):]
            content = m["content"].strip()
            at = span.find(content) if content else 0
            if at < 0:
                raise TemplateError(f"the chat template rewrote reply {i}: its text is not in the rendering")
            end, marker = len(span), None
            found = [(span.find(t, at + len(content)), t) for t in markers]
            found = [(f, t) for f, t in found if f >= 0]
            reply = [Segment(span, labelled=True)]
            if found:
                f, marker = min(found)
                end = f + len(marker)
                reply = [Segment(span[:end], labelled=True)]
                if _plain_added_token(tokenizer, marker):
                    # a special segment: later text is encoded from here, not from the last <image>
                    reply = [Segment(span[:f], labelled=True), Segment(marker, labelled=True, special=True)]
            segs += [Segment(full[pos:len(before)]), *reply, Segment(span[end:])]
            pos = len(through)
        segs.append(Segment(full[pos:]))
        return [s for s in segs if s.text]

    def prompt_segments(self, tokenizer, question, system):
        conv = ([{"from": "system", "value": system}] if system is not None else []) + [{"from": "human", "value": question}]
        return [Segment(self._render(tokenizer, self._messages(conv), generation=True))]

    def stop_token_ids(self, tokenizer):
        return [single_token_id(tokenizer, t) for t in self._end_markers(tokenizer)]


TEMPLATES: dict[str, type[ChatTemplate]] = {
    "plain": PlainTemplate,
    "vicuna_v1": VicunaV1Template,
    "llama3": Llama3Template,
    "chatml": ChatMLTemplate,
    "tokenizer": TokenizerTemplate,
}
_ALIASES = {"v1": "vicuna_v1", "vicuna": "vicuna_v1", "llava_v1": "vicuna_v1", "qwen": "chatml", "qwen2": "chatml",
            "llama_3": "llama3", "llava_llama_3": "llama3", "chat_template": "tokenizer"}


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """A template by name: plain, vicuna_v1, llama3, chatml, tokenizer (or an instance, returned)."""
    if isinstance(name, ChatTemplate):
        return name
    key = _ALIASES.get(name, name)
    try:
        return TEMPLATES[key]()
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; choose from {', '.join(TEMPLATES)}") from None


__all__ = ["CHATML_SYSTEM", "ChatTemplate", "Encoding", "IGNORE_INDEX", "LLAMA3_SYSTEM", "MissingSpecialTokenError",
           "ROLES", "Segment", "TEMPLATES", "TemplateError", "TokenizationMismatchError", "VICUNA_SYSTEM",
           "check_alignment", "encode_segments", "get_template", "single_token_id", "split_conversation",
           "tokenizer_adds_bos"]
