"""An lmms-eval model: ``--model hires_lmm --model_args pretrained=DIR[,template=...,batch_size=...]``.

:class:`HiresLMMEval` implements lmms-eval's ``lmms`` interface (``lmms_eval.api.model.lmms``):

* ``generate_until``: requests ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``;
  the images are ``doc_to_visual(self.task_dict[task][split][doc_id])`` (PIL images); the
  context gets one ``"<image>\\n"`` per image when it has no ``<image>`` (as lmms-eval's ``llava``
  model does) and is wrapped in the chat template. ``gen_kwargs``: ``until`` (stop strings),
  ``max_new_tokens`` (default 128), ``temperature`` (0 = greedy), ``top_p``; ``do_sample=False``
  forces greedy; ``num_beams`` > 1 is not supported (greedy is used, with a warning once).
  Requests with equal ``gen_kwargs`` are batched ``batch_size`` at a time; answers come back
  in request order.
* ``loglikelihood``: requests ``(context, doc_to_target, doc_to_visual, doc_id, task, split)``.
  The context (with its images) is the user turn and the continuation the assistant's reply,
  encoded by the chat template with labels on the reply and its end-of-turn token (as in
  training). Returns ``(loss, is_greedy)``: following lmms-eval's own models (``llava``,
  ``llava_hf``, ``qwen_vl``, … all return the LM's mean loss) and its ``multiple_choice``
  scoring (which takes the *argmin*), the first value is the mean negative log-likelihood of
  those tokens — lower is likelier — not lm-evaluation-harness's summed log-probability;
  ``is_greedy`` says whether greedy decoding yields every one of them. Each pair is a
  :class:`LoglikelihoodResult`, a plain tuple that, with lmms-eval ≥ 0.7, is also a
  ``GenerationResult``: lmms-eval 0.7's evaluator (``unwrap_generation_output``, up to 0.7.3 at
  least) turns every model output that is not a string or a ``GenerationResult`` into its
  ``str()``, so plain ``(loss, is_greedy)`` tuples — what its own models return — reach
  ``multiple_choice`` scoring as text and fail there; a ``GenerationResult`` whose ``text`` is
  the tuple comes through unchanged.
* ``generate_until_multi_round``: not supported (raises NotImplementedError).

Registration: importing this module registers the class under the name ``hires_lmm`` in
lmms-eval's registries (``register_model`` and, in lmms-eval ≥ 0.5, ``MODEL_REGISTRY_V2``).
``lmms-eval --model hires_lmm`` finds it without importing it first through the entry point
that pyproject.toml declares: ``[project.entry-points."lmms_eval.models"]
hires_lmm = "hires_lmm.eval.lmms_eval:lmms_eval_manifest"`` (lmms-eval ≥ 0.5 loads that group).
Installing lmms-eval beside the CPU torch, and what is tested: docs/evaluation.md.

lmms-eval is optional: without it the class derives from a small stand-in with the same
attributes (``rank``, ``world_size``, ``task_dict``), so it can be used and tested with any
objects that have an ``args`` tuple shaped like lmms-eval's ``Instance``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .predict import DEFAULT_TEMPLATE, IMAGE_PLACEHOLDER, load_model, training_template

if TYPE_CHECKING:
    from ..model import HiresLMM

MODEL_NAME = "hires_lmm"
CLASS_PATH = "hires_lmm.eval.lmms_eval.HiresLMMEval"

try:  # lmms-eval is optional
    from lmms_eval.api.model import lmms as _Base

    HAVE_LMMS_EVAL = True
except ImportError:  # pragma: no cover - exercised when lmms-eval is absent
    HAVE_LMMS_EVAL = False

    class _Base:  # type: ignore[no-redef]
        """Stand-in for ``lmms_eval.api.model.lmms`` (the attributes the evaluator reads)."""

        is_simple = True

        def __init__(self) -> None:
            self._rank = 0
            self._world_size = 1
            self.task_dict: dict[str, Any] = {}
            self.cache_hook = None

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None):
            """``"k1=v1,k2=v2"`` → ``cls(k1=v1, k2=v2, **additional_config)`` (values as strings)."""
            args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv.strip())
            extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
            return cls(**args, **extra)


try:  # lmms-eval >= 0.7 unwraps model outputs; see LoglikelihoodResult
    from lmms_eval.api.instance import GenerationResult as _ResultBase
except ImportError:  # no lmms-eval, or one before 0.7 (which keeps outputs as they are)

    class _ResultBase:  # type: ignore[no-redef]
        """Nothing to add where lmms-eval keeps model outputs as they come."""


class LoglikelihoodResult(tuple, _ResultBase):
    """``(loss, is_greedy)``: a plain tuple (equal to, and unpacked like, one) that is also an
    lmms-eval ``GenerationResult`` whose ``text`` is that tuple, so lmms-eval 0.7's
    ``unwrap_generation_output`` hands it to the task unchanged instead of as its ``str()``."""

    __slots__ = ()
    token_counts = None

    def __new__(cls, loss: float, is_greedy: bool) -> LoglikelihoodResult:
        return tuple.__new__(cls, (float(loss), bool(is_greedy)))

    def __init__(self, loss: float, is_greedy: bool) -> None:  # the tuple is made in __new__
        pass

    def __reduce__(self) -> tuple:
        return (type(self), tuple(self))

    # overrides GenerationResult.text where lmms-eval is installed (unused-ignore: where it is not)
    @property
    def text(self) -> tuple[float, bool]:  # type: ignore[override, unused-ignore]
        """The plain ``(loss, is_greedy)`` tuple (what lmms-eval's unwrapping passes on)."""
        return tuple(self)


def _as_bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "y")


class HiresLMMEval(_Base):
    """A :class:`~hires_lmm.model.HiresLMM` for lmms-eval.

    Args:
        pretrained: a model directory, or a loaded model.
        template: chat template (default: the model's training template, else ``vicuna_v1``).
        batch_size: requests per ``generate`` call.
        max_new_tokens: default when a task's ``gen_kwargs`` give none.
        device: default: cuda (``cuda:LOCAL_RANK``) when available, else cpu.
        kwargs: other ``--model_args`` lmms-eval passes (``max_batch_size``, ...) are ignored.
    """

    is_simple = True

    def __init__(self, pretrained: str | HiresLMM, template: str | None = None, batch_size: int | str = 1,
                 max_new_tokens: int | str = 128, device: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.model, model_dir = load_model(pretrained, device)
        self.template = template or training_template(model_dir, self.model) or DEFAULT_TEMPLATE
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        self._warned: set[str] = set()
        ignored = sorted(k for k in kwargs if k not in ("max_batch_size", "use_cache", "dtype"))
        if ignored:
            self._warn(f"hires_lmm ignores model_args {ignored}")

    # --- helpers --------------------------------------------------------------------------------
    def _warn(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            warnings.warn(msg, stacklevel=3)

    @staticmethod
    def _args(request: Any) -> tuple:
        args = getattr(request, "args", request)
        return args if isinstance(args, tuple) else (args,)

    def _doc(self, task: str, split: str | None, doc_id: Any) -> Any:
        docs = self.task_dict[task]
        return docs[split][doc_id] if split is not None else docs[doc_id]

    def _visuals(self, doc_to_visual: Any, task: str, split: str | None, doc_id: Any) -> list[Any]:
        if doc_to_visual is None:
            return []
        vis = doc_to_visual(self._doc(task, split, doc_id))
        vis = [] if vis is None else list(vis) if isinstance(vis, (list, tuple)) else [vis]
        out: list[Any] = []
        for v in vis:
            if isinstance(v, (list, tuple)):
                out.extend(v)
            else:
                out.append(v)
        for v in out:
            if not hasattr(v, "size") and not isinstance(v, (str, bytes, os.PathLike)):
                raise TypeError(f"hires_lmm takes images; got a {type(v).__name__} visual (video/audio unsupported)")
        return out

    @staticmethod
    def _with_images(context: str, n_images: int) -> str:
        if n_images and IMAGE_PLACEHOLDER not in context:
            return (IMAGE_PLACEHOLDER + "\n") * n_images + context
        return context

    def _decoding(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        g = dict(gen_kwargs or {})
        until = g.get("until", [])
        until = [until] if isinstance(until, str) else list(until or [])
        temperature = float(g.get("temperature", 0.0) or 0.0)
        if "do_sample" in g and not _as_bool(g["do_sample"]):
            temperature = 0.0
        if int(g.get("num_beams", 1) or 1) > 1:
            self._warn("hires_lmm does not do beam search; num_beams ignored (greedy/sampling used)")
        top_p = g.get("top_p")
        return {"stop": [u for u in until if u], "max_new_tokens": int(g.get("max_new_tokens", self.max_new_tokens)),
                "temperature": temperature, "top_p": float(top_p) if top_p is not None else 1.0}

    # --- lmms interface -------------------------------------------------------------------------
    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Answers to ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)`` requests."""
        from tqdm.auto import tqdm

        res: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):  # equal decoding settings share batches
            groups.setdefault(json.dumps(self._args(r)[1] or {}, sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="hires_lmm responding")
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                prompts, images = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = self._args(requests[i])[:6]
                    vis = self._visuals(doc_to_visual, task, split, doc_id)
                    prompts.append(self._with_images(str(context), len(vis)))
                    images.append(vis)
                dec = self._decoding(self._args(requests[chunk[0]])[1])
                texts = self.model.generate(prompts, images, template=self.template, seed=0, **dec)
                for i, t in zip(chunk, texts):
                    res[i] = t.strip()
                    self._cache("generate_until", requests[i], res[i])
                bar.update(len(chunk))
        bar.close()
        return [r if r is not None else "" for r in res]

    def loglikelihood(self, requests: Sequence[Any]) -> list[LoglikelihoodResult]:
        """``(loss, is_greedy)`` per request, lmms-eval's convention (see the module doc): the mean
        negative log-likelihood of the reply tokens, lower is likelier (each a
        :class:`LoglikelihoodResult`, a tuple)."""
        import torch

        from ..data.templates import get_template
        from ..model import IGNORE_INDEX

        tpl = get_template(self.template)
        out: list[LoglikelihoodResult] = []
        for r in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = self._args(r)[:6]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(self._doc(task, split, doc_id))
            vis = self._visuals(doc_to_visual, task, split, doc_id)
            conv = [{"from": "human", "value": self._with_images(str(context), len(vis))},
                    {"from": "gpt", "value": str(continuation)}]
            ids, labels = tpl.encode(self.model.tokenizer, conv)
            prepared = [self.model.prepare_image(v) for v in vis]
            with torch.no_grad():
                o = self.model([torch.tensor(ids)], [prepared], [torch.tensor(labels)])
            lab = o.batch.labels[0]
            where = (lab != IGNORE_INDEX).nonzero().flatten()
            where = where[where > 0]
            logits = o.logits[0, where - 1].float()  # the positions predicting the reply's tokens
            target = lab[where]
            nll = -torch.log_softmax(logits, -1).gather(-1, target[:, None]).squeeze(-1)
            res = LoglikelihoodResult(float(nll.mean()) if len(nll) else 0.0, bool((logits.argmax(-1) == target).all()))
            out.append(res)
            self._cache("loglikelihood", r, tuple(res))
        return out

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("hires_lmm does not support multi-round generation")

    def _cache(self, kind: str, request: Any, result: Any) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None and hasattr(hook, "add_partial"):
            hook.add_partial(kind, self._args(request), result)


def lmms_eval_manifest():
    """The lmms-eval ``ModelManifest`` of ``hires_lmm`` (for the ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register_with_lmms_eval() -> bool:
    """Register :class:`HiresLMMEval` as ``hires_lmm`` in lmms-eval's registries; False without
    lmms-eval. Safe to call again."""
    if not HAVE_LMMS_EVAL:
        return False
    try:  # the decorator registry (lmms-eval < 0.5 resolves models here)
        from lmms_eval.api.registry import register_model

        register_model(MODEL_NAME)(HiresLMMEval)
    except ImportError:
        pass
    try:  # lmms-eval >= 0.5 resolves models through MODEL_REGISTRY_V2
        from lmms_eval.models import MODEL_REGISTRY_V2
    except ImportError:  # older lmms-eval, or lmms_eval.models still initialising (entry-point load)
        return True
    MODEL_REGISTRY_V2.register_manifest(lmms_eval_manifest(), overwrite=True)
    return True


register_with_lmms_eval()

__all__ = ["CLASS_PATH", "HAVE_LMMS_EVAL", "HiresLMMEval", "LoglikelihoodResult", "MODEL_NAME", "lmms_eval_manifest", "register_with_lmms_eval"]
