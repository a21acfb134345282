"""The points where hires-lmm meets an API that moved between supported dependency versions
(:mod:`hires_lmm.compat`), checked against whatever versions are installed. Part of the drift
smoke subset (tests/smoke.txt), so the newest and the oldest allowed versions run it too."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from hires_lmm.compat import CACHE_FIELD, cache_kwargs, output_cache
from hires_lmm.methods import build_model
from hires_lmm.model import HiresOutput

TF = Version(transformers.__version__)


@pytest.fixture(scope="module")
def llm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_cache_field_follows_the_installed_transformers():
    # written against transformers 5.23 (past_key_values) and 5.24 (cache)
    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    assert CACHE_FIELD in names
    if TF >= Version("5.24.0"):
        assert CACHE_FIELD == "cache"
    elif TF < Version("5.24.0.dev0"):
        assert CACHE_FIELD == "past_key_values"


def test_cached_decoding_equals_a_full_forward_without_deprecation_warnings(llm):
    """The cache really is passed (a keyword the LLM silently swallowed would decode without
    context and differ from the full forward), and under the name this version expects."""
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        full = llm(input_ids=ids).logits[:, -1]
        first = llm(input_ids=ids[:, :-1], use_cache=True)
        cache = output_cache(first)
        assert cache is not None
        step = llm(input_ids=ids[:, -1:], use_cache=True, **cache_kwargs(llm, cache)).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_hires_output_is_a_causal_lm_output_with_the_cache_under_the_current_name():
    model = build_model("llava-1.5", tiny=True, seed=0)
    ids = torch.tensor(model.tokenizer("<image>\nhi", add_special_tokens=False).input_ids)
    from PIL import Image

    im = model.prepare_image(Image.new("RGB", (50, 40), (9, 99, 199)))
    with torch.no_grad():
        out = model([ids], [[im]], use_cache=True)
    assert isinstance(out, HiresOutput) and isinstance(out, CausalLMOutputWithPast)
    assert output_cache(out) is not None and getattr(out, CACHE_FIELD) is output_cache(out)
    assert out.batch is not None and out.logits.shape[1] == out.batch.inputs_embeds.shape[1]


def test_tokenizers_without_separator_tokens_work_for_methods_that_never_splice_them(monkeypatch):
    """Only UHD (",", "\\n") and SliME (",") splice separators; the others accept any tokenizer."""
    import hires_lmm.model as model_mod

    def no_single_token(tokenizer, sep):  # a word-level tokenizer: no single "," or "\n" token
        raise ValueError(f"the tokenizer has no single token for separator {sep!r}")

    monkeypatch.setattr(model_mod, "separator_id", no_single_token)
    for method in ("llava-1.5", "llava-next", "llava-hr", "inf-llava"):
        assert build_model(method, tiny=True, seed=0).separator_ids == {}
    for method, needs in (("llava-uhd", "','"), ("slime", "','")):
        with pytest.raises(ValueError, match=f"{method}.*separator {needs}"):
            build_model(method, tiny=True, seed=0)
