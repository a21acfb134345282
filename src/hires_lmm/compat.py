"""The few places where hires-lmm meets an API that changed between supported dependency versions.

Each helper reads the installed library's *public* surface (a dataclass's fields, a function's
signature) instead of its version string, so a release that renames something back or forward
keeps working. Every entry names the versions it was written against; ``tests/test_compat.py``
checks each against the installed version.

* **The KV-cache name** (transformers 5.24, `ModelOutput` and every causal LM's ``forward``):
  ``past_key_values`` became ``cache``. Up to 5.23 the output field and the keyword are
  ``past_key_values``; from 5.24 they are ``cache`` (the old keyword is renamed with a warning
  until 5.40, the old attribute reads through a deprecated property).

Other places that touch more than a dependency's documented API, each covered by a test in the
drift smoke subset (tests/smoke.txt) so a release that changes it fails the drift check, not a
user (written against transformers 5.6-5.24, torch 2.13, accelerate 1.0-1.15):

* ``ViT.packable()`` (vision/vit.py) ignores forward hooks named ``output_capturing_hook``, which
  transformers 5 leaves on every layer after an ``output_hidden_states`` call; any other hook
  still turns packing off. Test: ``tests/test_vision.py::test_encode_views_packs_after_a_transformers_hidden_states_call``.
* The serving engine merges and splits KV caches by batch row through ``DynamicCache.layers``
  and each ``DynamicLayer``'s ``keys``/``values`` (serve/engine.py); ``check_model`` refuses any
  other cache type at start-up. Test: ``tests/test_serve.py::test_concurrent_requests_are_batched_and_match_one_at_a_time``.
* Training checkpoints are the trainer's own safetensors + JSON files (train/checkpoint.py), not
  accelerate's ``save_state`` pickles, so accelerate's checkpoint layout is not relied on.
* The tests compare pixels with transformers' PIL image processors
  (``transformers.models.*.image_processing_pil_*``, present from 5.6): ``tests/test_render.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

#: the cache field of transformers' causal-LM outputs: "cache" (>= 5.24) or "past_key_values" (<= 5.23)
CACHE_FIELD: str = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a model output (``CausalLMOutputWithPast`` or any ``ModelOutput``), under
    whichever name the installed transformers gives it; None when it has none."""
    for name in ("cache", "past_key_values"):
        if dataclasses.is_dataclass(out) and name in {f.name for f in dataclasses.fields(out)}:
            return getattr(out, name)
    return None


@functools.lru_cache(maxsize=64)
def _cache_keyword(forward_type: type, name: str) -> str:
    fn = getattr(forward_type, name)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a C or wrapped callable without a signature
        return CACHE_FIELD
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    return CACHE_FIELD


def cache_kwargs(llm: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for ``llm.forward``: ``cache=`` where its signature takes it (transformers
    >= 5.24), else ``past_key_values=`` (<= 5.23, and remote-code models written for those)."""
    forward_type: type = type(llm)
    return {_cache_keyword(forward_type, "forward"): cache}
