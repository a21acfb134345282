"""Evaluation: benchmark metrics, batched prediction over LLaVA question files, scoring, chat and
an lmms-eval adapter.

* :mod:`.metrics`: VQA accuracy (EvalAI normalisation), ANLS, ChartQA relaxed accuracy, exact
  match, multiple-choice letter extraction. No torch.
* :mod:`.predict`: ``predict(model, question_file, image_folder, answers_file)`` (resumable,
  shardable, LLaVA's JSONL formats).
* :mod:`.evaluate`: ``evaluate(answers_file, ground_truth_file, metric)``. No torch.
* :mod:`.chat`: one-shot and interactive chat about an image.
* :mod:`.lmms_eval`: ``HiresLMMEval``, an lmms-eval model registered as ``hires_lmm``.
* :mod:`.cli`: ``hires predict``, ``hires eval``, ``hires chat``.

Nothing here imports torch at import time; the modules that need a model import it lazily.
"""

from __future__ import annotations

from .evaluate import evaluate
from .metrics import METRICS, anls, exact_match, extract_choice, mc_accuracy, normalize_vqa_answer, relaxed_accuracy, vqa_accuracy

__all__ = ["METRICS", "anls", "evaluate", "exact_match", "extract_choice", "mc_accuracy", "normalize_vqa_answer",
           "relaxed_accuracy", "vqa_accuracy"]
