"""Score an answers file against ground truth (no torch).

Answers: LLaVA's answer JSONL (``{"question_id", "text", ...}``, as :func:`~.predict.predict`
writes; records with an ``"error"`` field count as wrong and are reported). Several files (the
shards of one run) may be given together.

Ground truth: JSONL (or a JSON list) of ``{"question_id", "text": "..."}`` or
``{"question_id", "answers": [...]}``; the answers may be strings or VQA-style
``{"answer": "..."}`` objects. Optional fields: ``"category"`` (per-category scores) and, for
``mc``, ``"options"`` (a list of option texts, lettered A, B, …, or a letter → text mapping) or
``"choices"`` (the allowed letters). Categories and options are also read from the question file
when one is given (ground truth wins).

The score is the mean over *all* ground-truth questions, a missing answer counting 0, so an
incomplete run never scores higher than the complete one; ``answered_score`` is the mean over the
answered ones. Scores are fractions in [0, 1].
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .metrics import METRICS

#: How many missing/extra ids the report lists (the counts are always complete).
MAX_LISTED_IDS = 20

PathLike = str | os.PathLike


def read_records(path: PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL file (one object a line, blank lines skipped) or a JSON list."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        data = json.loads(text)
        if not all(isinstance(r, dict) for r in data):
            raise ValueError(f"{p}: a JSON list of objects was expected")
        return data
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{p}:{n}: a JSON object was expected")
        out.append(rec)
    return out


def _key(rec: dict[str, Any], where: str) -> str:
    if "question_id" not in rec:
        raise ValueError(f"{where}: a record has no question_id: {json.dumps(rec)[:200]}")
    return str(rec["question_id"])


def reference_answers(rec: dict[str, Any]) -> list[str]:
    """The reference answer strings of a ground-truth record (``answers`` or ``text``)."""
    if "answers" in rec:
        raw = rec["answers"]
    elif "text" in rec:
        raw = rec["text"]
    elif "answer" in rec:
        raw = rec["answer"]
    else:
        raise ValueError(f"ground truth {rec.get('question_id')!r} has no 'text' or 'answers'")
    raw = [raw] if isinstance(raw, (str, int, float)) else raw
    return [str(a["answer"]) if isinstance(a, dict) else str(a) for a in raw]


def evaluate(answers_file: PathLike | Sequence[PathLike], ground_truth_file: PathLike, metric: str, *,
             question_file: PathLike | None = None, **metric_options: Any) -> dict[str, Any]:
    """Score predictions with ``metric`` (``vqa``, ``anls``, ``relaxed``, ``exact`` or ``mc``).

    Returns ``{"metric", "score", "answered_score", "count", "answered", "errors", "missing",
    "missing_ids", "extra", "extra_ids", "duplicates", "categories": {name: {"score", "count"}}}``
    (``missing_ids``/``extra_ids`` list at most :data:`MAX_LISTED_IDS` ids, sorted; a later
    answer to the same question replaces an earlier one and is counted in ``duplicates``).
    ``metric_options`` go to the metric (e.g. ``threshold=0.5`` for ANLS).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    fn = METRICS[metric]
    files = [answers_file] if isinstance(answers_file, (str, os.PathLike)) else list(answers_file)
    answers: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for f in files:
        for rec in read_records(f):
            k = _key(rec, str(f))
            duplicates += k in answers
            answers[k] = rec
    gt: dict[str, dict[str, Any]] = {}
    for rec in read_records(ground_truth_file):
        k = _key(rec, str(ground_truth_file))
        if k in gt:
            raise ValueError(f"{ground_truth_file}: question_id {rec['question_id']!r} appears twice")
        gt[k] = rec
    questions = {_key(r, str(question_file)): r for r in read_records(question_file)} if question_file else {}

    scores: dict[str, float] = {}
    per_cat: dict[str, list[float]] = {}
    errors = 0
    for k, ref in gt.items():
        q = questions.get(k, {})
        pred = answers.get(k)
        if pred is None:
            s = 0.0
        elif pred.get("error"):
            errors += 1
            s = 0.0
        else:
            opts = dict(metric_options)
            if metric == "mc":
                for field in ("options", "choices"):
                    value = ref.get(field, q.get(field))
                    if value is not None and field not in opts:
                        opts[field] = value
            s = float(fn(str(pred.get("text", "")), reference_answers(ref), **opts))
            scores[k] = s
        cat = ref.get("category", q.get("category"))
        if cat is not None:
            per_cat.setdefault(str(cat), []).append(s)
        scores.setdefault(k, s)

    missing = sorted(set(gt) - set(answers), key=_sort_key)
    extra = sorted(set(answers) - set(gt), key=_sort_key)
    answered = [scores[k] for k in gt if k in answers]
    return {
        "metric": metric,
        "score": _mean(scores.values()),
        "answered_score": _mean(answered),
        "count": len(gt),
        "answered": len(answered),
        "errors": errors,
        "missing": len(missing),
        "missing_ids": missing[:MAX_LISTED_IDS],
        "extra": len(extra),
        "extra_ids": extra[:MAX_LISTED_IDS],
        "duplicates": duplicates,
        "categories": {c: {"score": _mean(v), "count": len(v)} for c, v in sorted(per_cat.items())},
    }


def _mean(values: Iterable[float]) -> float:
    v = list(values)
    return sum(v) / len(v) if v else 0.0


def _sort_key(k: str) -> tuple[int, Any]:
    return (0, int(k)) if k.lstrip("-").isdigit() else (1, k)


def format_report(rep: dict[str, Any]) -> str:
    """A readable summary of :func:`evaluate`'s result (scores in percent)."""
    lines = [f"{rep['metric']}: {100 * rep['score']:.2f}  ({rep['answered']}/{rep['count']} answered, "
             f"{rep['errors']} errors, {rep['missing']} missing, {rep['extra']} extra)"]
    if rep["missing"] or rep["errors"]:
        lines.append(f"  on answered questions: {100 * rep['answered_score']:.2f}")
    for c, v in rep["categories"].items():
        lines.append(f"  {c:<24} {100 * v['score']:6.2f}  (n={v['count']})")
    if rep["missing"]:
        more = " ..." if rep["missing"] > len(rep["missing_ids"]) else ""
        lines.append(f"  missing ids: {', '.join(rep['missing_ids'])}{more}")
    if rep["extra"]:
        more = " ..." if rep["extra"] > len(rep["extra_ids"]) else ""
        lines.append(f"  extra ids: {', '.join(rep['extra_ids'])}{more}")
    return "\n".join(lines)


__all__ = ["MAX_LISTED_IDS", "evaluate", "format_report", "read_records", "reference_answers"]
