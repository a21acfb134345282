"""Training data: chat templates (labels line up, mismatches are loud), record loading, validation,
the dataset and the length-grouped sampler."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from hires_lmm.data import (
    IGNORE_INDEX,
    DataError,
    DataFileNotFoundError,
    LengthGroupedSampler,
    LlavaDataset,
    MissingSpecialTokenError,
    RecordError,
    TemplateError,
    TokenizationMismatchError,
    VisualTokenCounter,
    check_alignment,
    collate,
    get_template,
    load_records,
    make_record,
    sample_indices,
    validate,
)
from hires_lmm.data.records import Record
from hires_lmm.data.templates import LLAMA3_SYSTEM
from hires_lmm.plan import plan_image
from hires_lmm.text import IMAGE_TOKEN, VICUNA_TEMPLATE, build_byte_tokenizer

# --- tokenizers built here ---------------------------------------------------------------------

#: Llama-3's pre-tokenisation pattern (Qwen2's differs only in splitting digits one by one)
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

QWEN2_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: What is in the picture? ASSISTANT: A cat sitting on a mat.",
    "system\n\nYou are a helpful language and vision assistant.\n\nuser\n\nassistant\n\n",
    "The quick brown fox jumps over the lazy dog. Compare these two images, the first is red.",
    "Ünïcödé — 日本語 🐱 猫 😊 text with spaces   and tabs\t\tand\n\nnewlines\n\n\n",
    "hello world\n\nhow are you?  fine thanks. General Kenobi!",
]


def _bpe_bytelevel(specials: list[str], **kw) -> PreTrainedTokenizerFast:
    """A byte-level BPE (Llama-3 / Qwen2 style) trained here on a tiny corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 30, trainer)
    return tok


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", IMAGE_TOKEN]
    tok = _bpe_bytelevel(specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|end_of_text|>", additional_special_tokens=specials[2:])
    fast.chat_template = LLAMA3_JINJA
    return fast


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
    fast = PreTrainedTokenizerFast(tokenizer_object=_bpe_bytelevel(specials), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    fast.chat_template = QWEN2_JINJA
    return fast


def spm_tokenizer() -> PreTrainedTokenizerFast:
    """Sentencepiece-like (as transformers converts Llama): "▁" for spaces, prepended to the first
    word only, byte fallback, BOS added by the post-processor."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", IMAGE_TOKEN] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS * 30, trainers.BpeTrainer(vocab_size=900, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=[IMAGE_TOKEN])
    fast.chat_template = VICUNA_TEMPLATE
    return fast


def spm_legacy_tokenizer() -> PreTrainedTokenizerFast:
    """The same vocabulary the way ``legacy=True`` Llama conversions tokenise: a "▁" prepended to
    every piece of text, also after special tokens (so it does not round-trip: "<image>\n" decodes
    as "<image> \n"), and no pre-tokenizer."""
    fast = spm_tokenizer()
    fast.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    fast.backend_tokenizer.pre_tokenizer = None
    return fast


_BUILT: dict[str, PreTrainedTokenizerFast] = {}
TOKENIZERS = {"byte": build_byte_tokenizer, "bpe-llama3": llama3_tokenizer, "bpe-chatml": chatml_tokenizer,
              "spm": spm_tokenizer, "spm-legacy": spm_legacy_tokenizer}


def tokenizer(name: str) -> PreTrainedTokenizerFast:
    """A fresh copy (tests may add tokens) of a tokenizer built once."""
    if name not in _BUILT:
        _BUILT[name] = TOKENIZERS[name]()
    return copy.deepcopy(_BUILT[name])


# --- conversations ---------------------------------------------------------------------------------

def H(v):  # noqa: N802
    return {"from": "human", "value": v}


def G(v):  # noqa: N802
    return {"from": "gpt", "value": v}


CONVS = {
    "one image": [H("<image>\nWhat is in the picture?"), G("A cat sitting on a mat.")],
    "multi-turn, two images, unicode": [
        {"from": "system", "value": "You are terse."},
        H("<image>\nCompare these <image> two images."), G("The first is red; the second is blue."),
        H("Ünïcödé: 日本語 🐱 — why?"), G("Because 猫 likes it. 😊"),
        H("trailing whitespace   "), G("ok   "),
    ],
    "empty reply": [H("Say nothing."), G(""), H("Now say hi."), G("hi")],
    "whitespace around": [H("  spaced question  "), G("\tTabbed answer\n"), H("<image>"), G(" x ")],
    "text only": [H("Hello there"), G("General Kenobi!")],
}
PLAIN_CONVS = {
    "caption": [H("<image>\nDescribe the image briefly."), G("A red square on a white background.")],
    "unicode caption, trailing space": [H("Render: <image>"), G("Ünïcödé 日本語 🐱  ")],
}


def expected_targets(template: str, tok_name: str, tok, conv) -> list[str]:
    """What each template trains on, written independently of the implementation."""
    replies = [t["value"] for t in conv if t["from"] == "gpt"]
    if template == "plain":
        return [replies[0] + "\n"]
    if template == "vicuna_v1" or (template == "tokenizer" and tok_name.startswith(("byte", "spm"))):
        if template == "tokenizer":  # text.VICUNA_TEMPLATE: "ASSISTANT: " + content + eos
            return [" " + r + tok.eos_token for r in replies]
        return [(" " + r if r else "") + tok.eos_token for r in replies]
    if template == "llama3" or (template == "tokenizer" and tok_name == "bpe-llama3"):
        return [r.strip() + "<|eot_id|>" for r in replies]
    return [r + "<|im_end|>" for r in replies]  # chatml, and Qwen2's own template


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def labelled_text(tok, ids, labels) -> str:
    """The text of the labelled tokens, each run decoded in its context (a sentencepiece decoder
    drops the "▁" of a sequence's first token, so a run decoded alone would lose its space)."""
    out, k = "", 0
    while k < len(ids):
        if labels[k] == IGNORE_INDEX:
            k += 1
            continue
        e = k
        while e < len(ids) and labels[e] != IGNORE_INDEX:
            assert labels[e] == ids[e]
            e += 1
        before, through = decode(tok, ids[:k]), decode(tok, ids[:e])
        assert through.startswith(before)
        out += through[len(before):]
        k = e
    return out


def cases():
    for tname in ("plain", "vicuna_v1", "llama3", "chatml", "tokenizer"):
        for tok_name in TOKENIZERS:
            for cname, conv in (PLAIN_CONVS if tname == "plain" else CONVS).items():
                yield pytest.param(tname, tok_name, conv, id=f"{tname}-{tok_name}-{cname}")


@pytest.mark.parametrize("tname,tok_name,conv", list(cases()))
def test_template_round_trip_labels_and_alignment(tname, tok_name, conv):
    tok = tokenizer(tok_name)
    tpl = get_template(tname)
    missing = tpl.missing_special_tokens(tok)
    if missing:  # a tokenizer without the template's special tokens: a clear error, then opt in
        with pytest.raises(MissingSpecialTokenError, match="add_special_tokens"):
            tpl.encode(tok, conv)
        assert tpl.add_special_tokens(tok) == len(missing)
    enc = tpl.encode_full(tok, conv)
    ids, labels = enc.input_ids, enc.labels
    # (c) one label per id, labels either -100 or the id itself
    assert len(ids) == len(labels)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    assert (ids, labels) == tpl.encode(tok, conv)
    # <image> is always exactly the tokenizer's one token
    n_img = sum(t["value"].count(IMAGE_TOKEN) for t in conv if t["from"] != "gpt")
    assert ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == n_img
    # (a) round trip: the ids decode to the rendered text (after the BOS the tokenizer adds itself)
    body = ids[1:] if enc.bos else ids
    if enc.bos:
        assert ids[0] == tok.bos_token_id
    assert enc.text == tpl.render(tok, conv)
    legacy = tok_name == "spm-legacy"  # decode(tokenize(x)) != x for this tokenizer itself
    assert decode(tok, body) == (decode(tok, tok(enc.text, add_special_tokens=False).input_ids) if legacy else enc.text)
    # (b) the labelled tokens are exactly the replies and their end-of-turn markers
    want = expected_targets(tname, tok_name, tok, conv)
    assert enc.targets == [t for t in want if t]
    if not legacy:
        assert labelled_text(tok, ids, labels) == "".join(want)
    if not tok_name.startswith("spm"):  # byte-level decoders: even the labelled ids alone decode exactly
        assert decode(tok, [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == "".join(want)
    # (b') independently of decoding: the labelled tokens are those whose characters (offsets in the
    # whole text tokenised in one go) lie in the replies' spans of the rendered text
    spans, at = [], 0
    for seg in tpl.segments(tok, conv):
        if seg.labelled:
            spans.append((at, at + len(seg.text)))
        at += len(seg.text)
    offsets = tok(enc.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) == len(body):  # always, unless a token straddles a boundary (see (d))
        for (a, b), lab in zip(offsets, labels[len(ids) - len(body):]):
            if b > a:
                inside = any(s <= a and b <= e for s, e in spans)
                assert inside == (lab != IGNORE_INDEX), (enc.text[a:b], lab)
    # (d) the same ids as the whole rendered text tokenised in one go, or a loud mismatch
    whole = ([tok.bos_token_id] if enc.bos else []) + tok(enc.text, add_special_tokens=False).input_ids
    if ids == whole:
        check_alignment(tok, ids, enc.text, bos=enc.bos, labels=labels, record_id="r1")
    else:
        with pytest.raises(TokenizationMismatchError, match="'r1'"):
            check_alignment(tok, ids, enc.text, bos=enc.bos, labels=labels, record_id="r1")
        assert tok_name.startswith("spm"), "byte-level tokenizers must never merge across these boundaries"


@pytest.mark.parametrize("tok_name", list(TOKENIZERS))
def test_bos_follows_the_tokenizer_and_matches_its_own_encoding(tok_name):
    tok = tokenizer(tok_name)
    tpl = get_template("vicuna_v1")
    enc = tpl.encode_full(tok, CONVS["one image"])
    assert enc.bos == (tok_name in ("bpe-llama3", "spm", "spm-legacy"))
    # exactly what HiresLMM.generate feeds: tokenizer(text) with its own special tokens
    assert enc.input_ids == tok(enc.text).input_ids
    assert tpl.encode(tok, CONVS["one image"], add_bos=False)[0] == tok(enc.text, add_special_tokens=False).input_ids


def test_reference_strings():
    """The rendered text of each named template, spelled out."""
    tok = tokenizer("byte")
    get_template("llama3").add_special_tokens(tok)
    get_template("chatml").add_special_tokens(tok)
    conv = [H("<image>\nHi?"), G("Yo."), H("More"), G("No.")]
    assert get_template("vicuna_v1").render(tok, conv) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nHi? ASSISTANT: Yo.</s>"
        "USER: More ASSISTANT: No.</s>")
    assert get_template("chatml").render(tok, conv) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nHi?<|im_end|>\n"
        "<|im_start|>assistant\nYo.<|im_end|>\n<|im_start|>user\nMore<|im_end|>\n<|im_start|>assistant\nNo.<|im_end|>\n")
    assert get_template("llama3").render(tok, conv) == (
        f"<|start_header_id|>system<|end_header_id|>\n\n{LLAMA3_SYSTEM}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nHi?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nYo.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nMore<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nNo.<|eot_id|>")
    assert get_template("plain").render(tok, [H("a photo <image> of"), G("A cat.")]) == "<image>A cat.\n"


@pytest.mark.parametrize("tname", ["plain", "vicuna_v1", "llama3", "chatml", "tokenizer"])
@pytest.mark.parametrize("tok_name", list(TOKENIZERS))
def test_prompt_is_the_training_text_up_to_the_reply(tname, tok_name):
    tok = tokenizer(tok_name)
    tpl = get_template(tname)
    tpl.add_special_tokens(tok)
    q = "<image>\nWhat is it?"
    conv = [H(q), G("A dog.")]
    enc = tpl.encode_full(tok, conv)
    prompt = tpl.prompt(tok, q)
    # the prompt is the training ids up to the first trained-on token
    first = next(k for k, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    assert prompt == enc.input_ids[:first], (prompt, enc.input_ids)
    assert tpl.prompt_text(tok, q) == enc.text[:len(tpl.prompt_text(tok, q))]
    for s in tpl.stop_strings if tname != "vicuna_v1" else [tok.eos_token]:  # vicuna: "</s>" is Llama's EOS
        assert s in enc.text
    assert tok.eos_token_id in tpl.stop_token_ids(tok) or tname in ("llama3", "chatml", "tokenizer")


def test_tokenizer_template_with_system_prompt_injection():
    """Qwen2's template adds its default system prompt; prefix rendering still finds the replies."""
    tok = tokenizer("bpe-chatml")
    enc = get_template("tokenizer").encode_full(tok, [H("hi"), G("yo"), H("again"), G("bye")])
    assert enc.text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert enc.targets == ["yo<|im_end|>", "bye<|im_end|>"]


def test_boundary_merge_is_detected_with_the_record_id():
    """A reply starting with "\\n" after ChatML's "assistant\\n": the byte-level split pattern
    groups "\\n\\n" when the text is tokenised whole, so the segment ids differ; check_alignment
    says so (and the dataset refuses the record instead of training on shifted labels)."""
    tok = tokenizer("bpe-chatml")
    conv = [H("hi"), G("\nindented answer")]
    enc = get_template("chatml").encode_full(tok, conv)
    whole = tok(enc.text, add_special_tokens=False).input_ids
    assert enc.input_ids != whole
    with pytest.raises(TokenizationMismatchError, match=r"record 'bad-42' \(x.json\).*mismatch at token"):
        check_alignment(tok, enc.input_ids, enc.text, labels=enc.labels, record_id="bad-42", source="x.json")
    ds = LlavaDataset([Record("bad-42", [], conv, "x.json", 0)], image_folder=None, tokenizer=tok, template="chatml")
    with pytest.raises(TokenizationMismatchError, match="bad-42"):
        ds[0]
    with pytest.raises(TokenizationMismatchError, match="3 input ids but 2 labels"):
        check_alignment(tok, [1, 2, 3], "abc", labels=[1, 2])


def test_naive_segment_encoding_mismatches_and_is_caught():
    """Encoding each segment alone (LLaVA's tokenizer_image_token splits on <image> and tokenises
    each chunk alone) gives a sentencepiece tokenizer a "▁" where the whole text has none; the
    template's context-aware encoding does not, and check_alignment catches the naive one."""
    tok = tokenizer("spm")
    tpl = get_template("vicuna_v1")
    conv = CONVS["one image"]
    enc = tpl.encode_full(tok, conv)
    naive = [tok.bos_token_id]  # LLaVA's tokenizer_image_token on the rendered text
    for k, piece in enumerate(enc.text.split(IMAGE_TOKEN)):
        naive += ([tok.convert_tokens_to_ids(IMAGE_TOKEN)] if k else []) + tok(piece, add_special_tokens=False).input_ids
    assert naive != enc.input_ids
    check_alignment(tok, enc.input_ids, enc.text, bos=True)
    with pytest.raises(TokenizationMismatchError, match=r"record 'llava-7'.*segment-wise \[.*'<image>', '▁', '\\n'"):
        check_alignment(tok, naive, enc.text, bos=True, record_id="llava-7")


def test_template_errors():
    tok = tokenizer("byte")
    v1 = get_template("vicuna_v1")
    with pytest.raises(TemplateError, match="unknown role 'bot'"):
        v1.encode(tok, [H("a"), {"from": "bot", "value": "b"}])
    with pytest.raises(TemplateError, match="alternate"):
        v1.encode(tok, [H("a"), H("b")])
    with pytest.raises(TemplateError, match="system turn may only come first"):
        v1.encode(tok, [H("a"), {"from": "system", "value": "s"}])
    with pytest.raises(TemplateError, match="one human turn and one gpt turn"):
        get_template("plain").encode(tok, CONVS["empty reply"])
    with pytest.raises(ValueError, match="unknown chat template"):
        get_template("nope")
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                   merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    assert bare.convert_tokens_to_ids("</s>") is not None and bare.convert_tokens_to_ids(IMAGE_TOKEN) is None
    with pytest.raises(MissingSpecialTokenError, match="<image>"):
        v1.encode(bare, CONVS["one image"])
    assert v1.encode(bare, CONVS["text only"])[0]  # text-only needs no <image>


# --- records -----------------------------------------------------------------------------------------

def write_json(path, data):
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def rec(i, image=None, conv=None, **extra):
    r = {"id": f"r{i}", "conversations": conv or [H("<image>\nq?" if image else "q?"), G(f"a{i}")]}
    if image is not None:
        r["image"] = image
    r.update(extra)
    return r


def test_load_json_jsonl_and_fields(tmp_path):
    data = [rec(0, "a.png"), rec(1), rec(2, ["a.png", "b.png"], [H("<image> and <image>"), G("two")]),
            {"images": ["c.png"], "conversations": [H("<image>x"), G("y")]}, {**rec(4), "image": None}]
    recs = load_records(write_json(tmp_path / "d.json", data))
    assert [r.id for r in recs] == ["r0", "r1", "r2", "d.json#3", "r4"]
    assert [r.images for r in recs] == [["a.png"], [], ["a.png", "b.png"], ["c.png"], []]
    assert recs[3].source == str(tmp_path / "d.json") and recs[3].index == 3
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in data) + "\n\n", encoding="utf-8")
    jl = load_records(tmp_path / "d.jsonl")
    assert [(r.images, r.conversations) for r in jl] == [(r.images, r.conversations) for r in recs]
    assert jl[3].id == "d.jsonl#3"
    # a .json file holding JSON lines is read as such
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in data), encoding="utf-8")
    assert len(load_records(tmp_path / "lines.json")) == 5
    assert len(load_records([tmp_path / "d.json", tmp_path / "d.jsonl"])) == 10


def test_file_errors(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="nope.json"):
        load_records(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('[{"id": 1,\n "conversations": [}]')
    with pytest.raises(DataError, match=r"bad.json.*line 2"):
        load_records(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl").write_text(json.dumps(rec(0)) + "\n" + json.dumps(rec(1)) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl.*line 3"):
        load_records(tmp_path / "bad.jsonl")
    write_json(tmp_path / "obj.json", {"hello": 1})
    with pytest.raises(DataError, match="expected a JSON list"):
        load_records(tmp_path / "obj.json")


def test_bad_records_named_by_id_and_file(tmp_path):
    data = [rec(0), {"id": "noconv"}, rec(2, conv=[H("a"), {"from": "bot", "value": "b"}]),
            rec(3, "a.png", [H("<image><image> two?"), G("x")]),
            rec(4, ["a.png", "b.png"], [H("<image> one?"), G("x")]),
            rec(5, "a.png", [H("q"), G("here <image>")])]
    path = write_json(tmp_path / "mix.json", data)
    with pytest.raises(RecordError) as e:
        load_records(path)
    msg = str(e.value)
    assert "5 bad record(s) of 6" in msg
    for rid, what in [("noconv", "has no conversations"), ("r2", "unknown role 'bot'"),
                      ("r3", "2 <image> placeholder(s) but 1 image(s)"), ("r4", "1 <image> placeholder(s) but 2 image(s)"),
                      ("r5", "gpt reply contains <image>")]:
        assert f"record '{rid}' ({path}): " in msg and what in msg
    assert len(load_records(path, strict=False)) == 6


def test_placeholder_convention():
    r = make_record(rec(0, "a.png", [H("What is this?"), G("A cat.")]))
    assert r.conversations[0]["value"] == "<image>\nWhat is this?"
    r = make_record(rec(0, ["a.png", "b.png"], [{"from": "system", "value": "s"}, H("Same?"), G("No.")]))
    assert r.conversations[1]["value"] == "<image>\n<image>\nSame?"
    raw = rec(0, "a.png", [H("What?\n<image>"), G("x")])
    assert make_record(raw).conversations[0]["value"] == "What?\n<image>"
    assert make_record(raw, image_first=True).conversations[0]["value"] == "<image>\nWhat?"  # LLaVA's preprocess_multimodal
    assert raw["conversations"][0]["value"] == "What?\n<image>"  # the loaded data is left alone


def test_yaml_mixture_and_sampling(tmp_path):
    sub = tmp_path / "jsons"
    sub.mkdir()
    write_json(sub / "a.json", [rec(i) for i in range(10)])
    (sub / "b.jsonl").write_text("\n".join(json.dumps(rec(100 + i)) for i in range(20)))
    write_json(sub / "c.json", [rec(200 + i) for i in range(7)])

    def mix(*entries, seed=0):
        y = "datasets:\n" + "".join(f"  - json_path: {p}\n    sampling_strategy: \"{s}\"\n" for p, s in entries)
        (tmp_path / "mix.yaml").write_text(y)
        return [r.id for r in load_records(tmp_path / "mix.yaml", seed=seed)]

    assert mix(("jsons/a.json", "all")) == [f"r{i}" for i in range(10)]
    assert mix(("jsons/a.json", "first:3"), ("jsons/b.jsonl", "end:2")) == ["r0", "r1", "r2", "r118", "r119"]
    assert mix(("jsons/a.json", "first:25%"), ("jsons/c.json", "end:50%")) == ["r0", "r1", "r2", "r203", "r204", "r205", "r206"]
    assert mix(("jsons/a.json", "first:50")) == [f"r{i}" for i in range(10)]  # more than there are: all
    assert mix(("jsons/a.json", "end:0")) == []
    picked = mix(("jsons/b.jsonl", "random:5"))
    assert len(picked) == 5 == len(set(picked)) and set(picked) <= {f"r{100 + i}" for i in range(20)}
    assert picked == mix(("jsons/b.jsonl", "random:5"))  # seeded: the same every run
    assert picked != mix(("jsons/b.jsonl", "random:5"), seed=1)
    assert len(mix(("jsons/b.jsonl", "random:10%"))) == 2
    assert len(mix((str(sub / "c.json"), "random:50%"))) == 4  # ceil, as LLaVA-NeXT; absolute paths too
    recs = load_records(tmp_path / "mix.yaml")
    assert recs[0].source == str(sub / "c.json")
    for bad, match in [("sometimes", "unknown sampling strategy"), ("first:x", "first:N"), ("random:150%", "percentage")]:
        with pytest.raises(DataError, match=match):
            mix(("jsons/a.json", bad))
    with pytest.raises(DataFileNotFoundError, match=r"mix.yaml.*entry 1.*missing.json"):
        mix(("jsons/a.json", "all"), ("jsons/missing.json", "all"))
    assert sample_indices(10, "random:3", seed=0, key="k") == sample_indices(10, "random:3", seed=0, key="k")


# --- validation --------------------------------------------------------------------------------------

@pytest.fixture()
def bad_data(tmp_path):
    img = tmp_path / "images"
    img.mkdir()
    Image.new("RGB", (64, 48), "red").save(img / "good.png")
    Image.new("RGB", (40, 40), "blue").save(img / "good.jpg")
    Image.new("RGB", (64, 64), "green").save(img / "full.png")
    data = (img / "full.png").read_bytes()
    (img / "truncated.png").write_bytes(data[: len(data) // 2])
    (img / "notes.jpg").write_text("this is not a picture")
    records = [
        rec(0, "good.png"),
        rec(1, "missing.png"),
        rec(2, "truncated.png"),
        rec(3, "notes.jpg"),
        rec(4, conv=[H("a"), {"from": "robot", "value": "b"}]),
        rec(5, "good.png", [H("<image> <image> how many?"), G("one")]),
        rec(6, ["good.png", "good.jpg"], [H("<image> vs <image> " + "very " * 30), G("long")]),
        rec(7),
        rec(8, conv=[H("question only")]),
    ]
    path = write_json(tmp_path / "train.json", records)
    return img, path


def test_validate_finds_every_bad_record(bad_data):
    img, path = bad_data
    recs = load_records(path, strict=False)
    tok = tokenizer("byte")
    # llava-1.5: 576 visual tokens per image; record r6 has two images: > 1200 tokens
    report = validate(recs, image_folder=img, tokenizer=tok, template="vicuna_v1", max_length=1200, method="llava-1.5")
    by_id: dict[str, list[str]] = {}
    for p in report.problems:
        assert p.source == str(path)
        by_id.setdefault(p.record_id, []).append(p.message)
    assert set(by_id) == {"r1", "r2", "r3", "r4", "r5", "r6", "r8"}
    assert "not found" in by_id["r1"][0] and "missing.png" in by_id["r1"][0]
    assert "truncated" in by_id["r2"][0] and "IEND" in by_id["r2"][0]
    assert "not a recognised image format" in by_id["r3"][0] and "notes.jpg" in by_id["r3"][0]
    assert any("unknown role 'robot'" in m for m in by_id["r4"])
    assert any("2 <image> placeholder(s) but 1 image(s)" in m for m in by_id["r5"])
    (msg,) = by_id["r6"]
    assert "exceeds max_length 1200" in msg and "1152 visual for 2 image(s) with llava-1.5" in msg
    assert "no reply to train on" in by_id["r8"][0]
    assert [r.id for r in report.ok_records] == ["r0", "r7"]
    enc0 = get_template("vicuna_v1").encode(tok, recs[0].conversations)[0]
    assert report.lengths[0] == len(enc0) - 1 + plan_image("llava-1.5", (64, 48)).num_visual_tokens
    with pytest.raises(RecordError) as e:
        report.raise_if_bad(limit=3)
    text = str(e.value)
    assert text.startswith(f"7 bad record(s) of 9, {len(report.problems)} problem(s):")
    assert f"record 'r1' ({path}): image file" in text and "... and" in text
    # decoding fully finds the same images bad; without images only text problems remain
    full = validate(recs, image_folder=img, tokenizer=tok, template="vicuna_v1", max_length=None, method=None,
                    check_images="decode")
    assert {p.record_id for p in full.problems} == {"r1", "r2", "r3", "r4", "r5", "r8"}
    text_only = validate(recs, image_folder=img, tokenizer=tok, template="vicuna_v1", max_length=None, method=None,
                         check_images=False)
    assert {p.record_id for p in text_only.problems} == {"r4", "r5", "r8"}
    assert validate(recs[:1], image_folder=img, tokenizer=tok, template="vicuna_v1", max_length=4096,
                    method="llava-uhd").ok


def test_validate_reports_template_and_mismatch_problems(tmp_path):
    tok = tokenizer("bpe-chatml")
    recs = [make_record(rec(0), source="s.json"), make_record(rec(1, conv=[H("a"), G("\n\nb")]), source="s.json", index=1),
            make_record(rec(2, conv=[H("a"), H("b")]), source="s.json", index=2)]
    report = validate(recs, image_folder=tmp_path, tokenizer=tok, template="chatml", max_length=None, method=None)
    assert [(p.record_id, p.source) for p in report.problems] == [("r1", "s.json"), ("r2", "s.json")]
    assert "tokenization mismatch" in report.problems[0].message
    assert "alternate" in report.problems[1].message
    with pytest.raises(ValueError, match="needs the method"):
        validate([make_record(rec(0, "x.png"))], image_folder=tmp_path, tokenizer=tok, template="chatml",
                 max_length=100, method=None)


# --- dataset, collate, sampler ------------------------------------------------------------------------

class FakeModel:
    """Stands in for HiresLMM: a config with the method, and prepare_image."""

    class config:  # noqa: N801
        method = "llava-next"
        plan_options: dict = {}

    def prepare_image(self, path):
        return ("prepared", os.path.basename(path))


def test_dataset_items_lengths_and_collate(bad_data):
    img, path = bad_data
    recs = [r for r in load_records(path, strict=False) if r.id in ("r0", "r6", "r7")]
    tok = tokenizer("byte")
    ds = LlavaDataset(recs, image_folder=img, tokenizer=tok, template="vicuna_v1", method="llava-1.5")
    item = ds[0]
    assert item["id"] == "r0" and item["images"] == [str(img / "good.png")] and os.path.isabs(item["images"][0])
    assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == item["labels"].shape
    assert item["num_text_tokens"] == item["input_ids"].shape[0]
    assert (item["input_ids"] == tok.convert_tokens_to_ids(IMAGE_TOKEN)).sum() == 1
    n = [ds[i]["num_text_tokens"] for i in range(3)]
    assert ds.lengths() == [n[0] + 575, n[1] + 2 * 575, n[2]]
    assert ds.lengths() is ds.lengths()  # cached
    batch = collate([ds[i] for i in range(3)])
    assert batch["ids"] == ["r0", "r6", "r7"] and len(batch["images"][1]) == 2 and batch["images"][2] == []
    assert [t.shape for t in batch["labels"]] == [t.shape for t in batch["input_ids"]]
    assert "image_inputs" not in batch and LlavaDataset.collate is not None
    # a model's prepare_image: prepared images in the items, the method taken from the model
    m = FakeModel()
    ds2 = LlavaDataset(recs, image_folder=img, tokenizer=tok, template="vicuna_v1", model_prepare=m.prepare_image)
    assert ds2.method == "llava-next" and ds2[1]["image_inputs"] == [("prepared", "good.png"), ("prepared", "good.jpg")]
    assert collate([ds2[0], ds2[1]])["image_inputs"][0] == [("prepared", "good.png")]
    nx = plan_image("llava-next", (64, 48)).num_visual_tokens
    assert ds2.lengths()[0] == n[0] - 1 + nx
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    assert [b["ids"] for b in loader] == [["r0", "r6"], ["r7"]]


def test_dataset_feeds_the_model(bad_data):
    """Items go straight into HiresLMM: one placeholder per image, labels aligned, loss finite."""
    from hires_lmm.methods import build_model

    img, path = bad_data
    recs = [r for r in load_records(path, strict=False) if r.id in ("r0", "r7")]
    model = build_model("llava-1.5", tiny=True)
    ds = LlavaDataset(recs, image_folder=img, tokenizer=model.tokenizer, template="vicuna_v1",
                      model_prepare=model.prepare_image)
    b = collate([ds[0], ds[1]])
    with torch.no_grad():
        out = model(b["input_ids"], b["image_inputs"], labels=b["labels"])
    assert torch.isfinite(out.loss)
    assert out.batch.attention_mask.sum(1).tolist() == ds.lengths()


def test_dataset_lengths_of_a_composed_method_are_the_spliced_lengths(bad_data):
    """A model of NeXT's tiles through UHD's resampler: lengths() counts its parts' tokens (the
    planner alone counts ~4x more), equal to the attention mask of the real forward."""
    from hires_lmm.methods import build_model

    img, path = bad_data
    recs = [r for r in load_records(path, strict=False) if r.id in ("r0", "r6", "r7")]
    model = build_model({"base": "llava-next", "compressor": "uhd-spatial"}, tiny=True)
    ds = LlavaDataset(recs, image_folder=img, tokenizer=model.tokenizer, template="vicuna_v1",
                      model_prepare=model.prepare_image)
    assert ds.method_spec is not None
    b = collate([ds[i] for i in range(3)])
    with torch.no_grad():
        out = model(b["input_ids"], b["image_inputs"], labels=b["labels"])
    assert out.batch.attention_mask.sum(1).tolist() == ds.lengths()
    planner = LlavaDataset(recs, image_folder=img, tokenizer=model.tokenizer, template="vicuna_v1", method="llava-next")
    assert planner.lengths()[0] > ds.lengths()[0]


def llava_reference(lengths, batch_size, world_size, generator):
    """haotian-liu/LLaVA's get_length_grouped_indices, written out for comparison."""
    indices = torch.randperm(len(lengths), generator=generator)
    mb = world_size * batch_size
    megabatches = [indices[i:i + mb].tolist() for i in range(0, len(lengths), mb)]
    megabatches = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megabatches]
    out = []
    for m in megabatches:
        per = len(m) // world_size
        chunks, totals = [[] for _ in range(world_size)], [0] * world_size
        for i in m:
            c = totals.index(min(totals))
            chunks[c].append(i)
            totals[c] += lengths[i]
            if len(chunks[c]) == per:
                totals[c] = float("inf")
        out += [i for c in chunks for i in c]
    return out


def test_length_grouped_sampler():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 2000, (103,), generator=g).tolist()
    s = LengthGroupedSampler(lengths, batch_size=4, seed=7)
    order = list(s)
    assert sorted(order) == list(range(103)) and len(s) == 103
    assert order == list(LengthGroupedSampler(lengths, batch_size=4, seed=7))  # deterministic
    s.set_epoch(1)
    assert list(s) != order and sorted(s) == list(range(103))
    # the same order as LLaVA's, with its generator seeded by seed + epoch (here divisible sizes)
    lengths96 = lengths[:96]
    for ws in (1, 2, 4):
        ours = LengthGroupedSampler(lengths96, batch_size=4, world_size=ws, rank=None, seed=3)
        ours.set_epoch(2)
        assert list(ours) == llava_reference(lengths96, 4, ws, torch.Generator().manual_seed(5))
    # within a batch, lengths are grouped: each batch is a slice of a megabatch sorted longest first
    for k in range(0, 100, 4):
        batch = [lengths[i] for i in order[k:k + 4]]
        assert batch == sorted(batch, reverse=True)
    # rank split: disjoint, equal sizes, together all but len % world_size samples
    for ws in (2, 3, 4):
        ranks = [list(LengthGroupedSampler(lengths, 4, world_size=ws, rank=r, seed=1)) for r in range(ws)]
        sizes = {len(x) for x in ranks}
        assert sizes == {103 // ws} == {len(LengthGroupedSampler(lengths, 4, world_size=ws, rank=0))}
        flat = [i for x in ranks for i in x]
        assert len(set(flat)) == len(flat) == 103 - 103 % ws
        glob = list(LengthGroupedSampler(lengths, 4, world_size=ws, rank=None, seed=1))
        # the global order deals batch k of the megabatch to rank k % world_size (accelerate's way)
        dealt = [[] for _ in range(ws)]
        for k in range(0, len(glob), 4):
            dealt[(k // 4) % ws] += glob[k:k + 4]
        if (103 - 103 % ws) % (4 * ws) == 0:
            assert dealt == ranks
        # the ranks' batches at the same step come from the same megabatch: similar lengths
        assert ranks[0][:4] != ranks[1][:4]
    with pytest.raises(ValueError, match="rank"):
        LengthGroupedSampler(lengths, 4, world_size=2, rank=2)


# --- composed methods: counted as the model splices ------------------------------------------------------

NEXT_UHD = {"base": "llava-next", "compressor": "uhd-spatial"}


def test_visual_token_counter_counts_a_composed_method_by_its_parts():
    from hires_lmm.parts import spec_from_dict
    from hires_lmm.processing import plan_for

    spec = spec_from_dict(NEXT_UHD)
    for size in [(64, 48), (1000, 700), (300, 1200)]:
        composed = VisualTokenCounter("llava-next", method_spec=NEXT_UHD)
        assert composed(size) == spec.plan(size).num_visual_tokens == plan_for("llava-next", size, None, NEXT_UHD).num_visual_tokens
        assert composed(size) < plan_image("llava-next", size).num_visual_tokens  # the planner alone over-counts
        assert VisualTokenCounter(None, {}, method_spec=spec)(size) == composed(size)  # a MethodSpec, no method
        # a budget applies to the composed count (the planner alone would refuse 600 for 1000x700)
        budgeted = VisualTokenCounter("llava-next", {"max_visual_tokens": 600}, method_spec=NEXT_UHD)
        assert budgeted(size) == plan_for("llava-next", size, {"max_visual_tokens": 600}, NEXT_UHD).num_visual_tokens <= 600
        # a preset (no spec, or an empty one) is the planner's count, as before
        assert VisualTokenCounter("llava-next")(size) == plan_image("llava-next", size).num_visual_tokens
        assert VisualTokenCounter("llava-next", method_spec={})(size) == plan_image("llava-next", size).num_visual_tokens
    assert VisualTokenCounter("llava-next", method_spec=NEXT_UHD).name == spec.name
    with pytest.raises(ValueError, match="method or a method_spec"):
        VisualTokenCounter(None)


def test_visual_token_counter_prepares_what_prepare_image_prepares_and_survives_pickling(tmp_path):
    import pickle

    import torch

    from hires_lmm.processing import prepare_image

    path = tmp_path / "wide.png"
    Image.new("RGB", (900, 500), (200, 40, 90)).save(path)
    for method, options, spec in [("llava-next", None, NEXT_UHD), ("llava-next", {"max_visual_tokens": 600}, NEXT_UHD),
                                  ("llava-uhd", {}, None)]:
        counter = VisualTokenCounter(method, options, method_spec=spec)
        want = prepare_image(str(path), method, options, method_spec=spec)
        for c in (counter, pickle.loads(pickle.dumps(counter))):  # a DataLoader worker's copy plans alike
            got = c.prepare(str(path))
            assert got.plan.views == want.plan.views and got.plan.num_visual_tokens == want.plan.num_visual_tokens
            assert got.plan.num_visual_tokens == c.num_visual_tokens((900, 500)) == c((900, 500))
            assert all(torch.equal(a, b) for a, b in zip(got.views, want.views)) and len(got.views) == len(want.views)
    # plan_options=None keeps a spec's own views options when rendering, as when counting
    own = VisualTokenCounter(None, None, method_spec={**NEXT_UHD, "views_options": {"max_visual_tokens": 300}})
    assert own.prepare(str(path)).plan.num_visual_tokens == own((900, 500)) == 222  # 494 unbudgeted


def test_validate_counts_a_budget_refusal_as_a_bad_record(tmp_path):
    from hires_lmm.plan import NEXT_PINPOINTS

    img = tmp_path / "images"
    img.mkdir()
    Image.new("RGB", (500, 400), "red").save(img / "big.png")  # llava-next: no plan within 800 tokens
    Image.new("RGB", (200, 800), "blue").save(img / "tall.png")  # 744 tokens at its smallest
    assert min(plan_image("llava-next", (500, 400), pinpoints=[p]).num_visual_tokens for p in NEXT_PINPOINTS) > 800
    recs = [make_record(rec(0, "big.png"), source="s.json"), make_record(rec(1, "tall.png"), source="s.json", index=1),
            make_record(rec(2, "big.png", [H("<image> " + "word " * 400), G("x")]), source="s.json", index=2)]
    report = validate(recs, image_folder=img, tokenizer=tokenizer("byte"), template="vicuna_v1", max_length=2000,
                      method="llava-next", plan_options={"max_visual_tokens": 800})
    assert [p.record_id for p in report.problems] == ["r0", "r2"] and report.budget_problems == report.problems
    assert "max_visual_tokens" in report.problems[0].message and "\n" not in report.problems[0].message
    assert [r.id for r in report.ok_records] == ["r1"]
    enc = get_template("vicuna_v1").encode(tokenizer("byte"), recs[1].conversations)[0]
    assert report.lengths == [len(enc) - 1 + plan_image("llava-next", (200, 800), max_visual_tokens=800).num_visual_tokens]
    # a record without images over max_length is a text-only length problem, counted or not
    long = [make_record(rec(3, conv=[H("word " * 600), G("x")]), source="s.json", index=3)]
    (msg,) = [p.message for p in validate(long, image_folder=img, tokenizer=tokenizer("byte"), template="vicuna_v1",
                                          max_length=2000, method="llava-next").problems]
    assert msg.startswith("sequence of") and "text tokens exceeds max_length 2000" in msg


def test_validate_counts_a_composed_method_by_its_parts(bad_data):
    from hires_lmm.parts import spec_from_dict

    img, path = bad_data
    recs = load_records(path, strict=False)
    tok = tokenizer("byte")
    spec = spec_from_dict(NEXT_UHD)
    n = spec.plan((64, 48)).num_visual_tokens
    n6 = n + spec.plan((40, 40)).num_visual_tokens  # r6: good.png and good.jpg
    preset6 = plan_image("llava-next", (64, 48)).num_visual_tokens + plan_image("llava-next", (40, 40)).num_visual_tokens
    assert n6 < preset6
    enc0 = get_template("vicuna_v1").encode(tok, recs[0].conversations)[0]
    text6 = len(get_template("vicuna_v1").encode(tok, recs[6].conversations)[0]) - 2
    # r6 (two images and a long question) fits max_length by the composed count, not by the planner's
    limit = text6 + n6
    report = validate(recs, image_folder=img, tokenizer=tok, template="vicuna_v1", max_length=limit,
                      method="llava-next", method_spec=NEXT_UHD)
    assert [r.id for r in report.ok_records] == ["r0", "r6", "r7"]
    assert report.lengths[:2] == [len(enc0) - 1 + n, limit]
    over = validate(recs, image_folder=img, tokenizer=tok, template="vicuna_v1", max_length=limit - 1,
                    method=None, method_spec=NEXT_UHD)
    (msg,) = [p.message for p in over.problems if p.record_id == "r6"]
    assert f"{n6} visual for 2 image(s) with {spec.name}" in msg
    preset_report = validate(recs, image_folder=img, tokenizer=tok, template="vicuna_v1", max_length=limit,
                             method="llava-next")
    assert "r6" not in [r.id for r in preset_report.ok_records]
