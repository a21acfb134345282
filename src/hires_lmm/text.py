"""Tokenizer helpers: a tokenizer built locally for the tiny presets, the ``<image>`` placeholder,
and separator ids looked up from the tokenizer itself (never hard-coded ids)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"

#: Vicuna v1's conversation format as a Jinja chat template (LLaVA-1.5's default).
VICUNA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}{% set loop_messages = messages[1:] %}"
    "{% else %}{{ 'A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user\\'s questions. ' }}"
    "{% set loop_messages = messages %}{% endif %}"
    "{% for m in loop_messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte → printable character table (what the ByteLevel pre-tokenizer emits)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_byte_tokenizer(words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in memory: 256 byte tokens plus ``<s>``, ``</s>``, ``<pad>``,
    ``<unk>`` and ``<image>``. Every character is one or a few tokens, so "," and "\\n" are
    single tokens; no download, deterministic ids.

    ``words``: whole words that become single tokens, alone and after a space (``"red"`` and
    ``" red"``), as in any word-piece vocabulary; the text is then split into words first
    (GPT-2's pre-tokenization) and a word in the vocabulary is one token, any other word its
    bytes. A tiny language model trained from scratch then answers "red" with one token instead
    of spelling it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    chars = _byte_chars()
    for form in sorted({f for w in words for f in (w, " " + w)}):
        vocab.setdefault("".join(chars[b] for b in form.encode("utf-8")), len(vocab))
    # ignore_merges: a pre-tokenized word found in the vocabulary is taken whole (no merges needed)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=bool(words))
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=[IMAGE_TOKEN])
    fast.chat_template = VICUNA_TEMPLATE
    fast.model_max_length = 8192
    return fast


def ensure_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Id of ``<image>``, adding it as a special token when the tokenizer lacks it."""
    # transformers types the result as int | list[int]; for one token (a str) it is an int or None
    tid = cast("int | None", tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    if tid is None or tid == tokenizer.unk_token_id:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        tid = cast(int, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))  # just added: an int
    return int(tid)


def separator_id(tokenizer: PreTrainedTokenizerBase, sep: str) -> int:
    """The token id of ``sep`` ("," or "\\n") as it appears after a word.

    Tokenising ``"a" + sep`` and removing the tokens of ``"a"`` finds the id a sentencepiece
    tokenizer uses mid-text (Llama: "," → 29892, "\\n" → 13 via byte fallback, not the
    prefix-space pieces a bare ``encode(",")`` returns), and works for byte-level BPE too.
    """
    a = tokenizer.encode("a", add_special_tokens=False)
    both = tokenizer.encode("a" + sep, add_special_tokens=False)
    if both[: len(a)] == a and len(both) == len(a) + 1:
        return int(both[-1])
    alone = tokenizer.encode(sep, add_special_tokens=False)
    if len(alone) == 1:
        return int(alone[0])
    raise ValueError(f"the tokenizer has no single token for separator {sep!r} (got {alone})")
