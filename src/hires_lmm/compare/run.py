"""Train several methods with the same budget on the same data, score them, set them against
their compute.

For each method (and token budget, once the planner has budgets) and each seed, one *run*:

1. the model: ``--tiny`` builds the tiny preset (given ``--vision``/``--convnext``/``--llm``
   directories replace its random encoders / LLM, as the demo's pretrained ones do; its tokenizer
   gets whole-word tokens of the data's words, so that short answers are single tokens), else
   the method around local Hugging Face directories;
2. optionally the paper's projector-alignment stage (``--align-steps``: the method's first stage,
   e.g. stage 1 on captions, connector only), then the main stage (``--stage``, default
   ``frozen-encoders``) for ``--steps`` steps: ``hires train`` (:func:`hires_lmm.train.train`);
3. ``hires predict`` on the held-out questions, ``hires eval`` with ``--metric`` (exact match by
   default);
4. visual tokens: the mean per training sample, as measured by the trainer (SliME's selector
   keeps a question-dependent number); TFLOPs per image: :func:`hires_lmm.plan.cost.plan_cost` of
   the model's plan of each held-out image, averaged over the questions (a tiny model is costed at
   full size: CLIP ViT-L/14, ConvNeXt-L, a ``llm_params`` LLM; a full-size model at its own).

Every run is cached under ``OUT/runs/<method>/seed-<s>`` with the settings and data files that
made it, so an interrupted comparison resumes where it stopped (``fresh`` starts over).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import HiresError, one_line

__all__ = ["CompareConfig", "CompareError", "aggregate", "budgets_supported", "pareto_front", "run_compare",
           "run_key", "words_of"]


class CompareError(HiresError, ValueError):
    """A comparison that cannot run as asked (bad settings, missing files, unsupported budgets)."""


#: the words a tiny tokenizer gets at most (the most frequent of the data; the rest falls back to bytes)
MAX_WORDS = 4096


@dataclass(frozen=True)
class CompareConfig:
    """Everything that decides a comparison's numbers."""

    data_path: str                       #: LLaVA training data (JSON, JSONL or a LLaVA-NeXT YAML)
    image_folder: str
    question_file: str                   #: held-out questions (JSONL: question_id, image, text)
    answers_file: str                    #: their ground truth (JSONL: question_id, text or answers)
    methods: tuple[str, ...]
    tiny: bool = False
    vision: str | None = None
    llm: str | None = None
    convnext: str | None = None
    words: tuple[str, ...] | None = None  #: the tiny tokenizer's whole words (None: from the data)
    steps: int = 100
    batch_size: int = 8
    lr: float | None = None              #: one rate for every method (None: the stage's own)
    lr_schedule: str = "cosine"
    warmup_ratio: float = 0.03
    stage: str = "frozen-encoders"
    template: str | None = None
    align_steps: int = 0                 #: steps of the method's first paper stage before ``stage``
    align_data_path: str | None = None   #: its data (default: ``data_path``), e.g. captions
    align_lr: float | None = None        #: its learning rate (None: the paper's, 1e-3)
    seeds: tuple[int, ...] = (0,)
    max_visual_tokens: tuple[int, ...] = ()
    metric: str = "exact"
    max_new_tokens: int = 16
    eval_batch: int = 8
    llm_params: float = 7e9              #: the LLM a tiny model is costed with
    chance: float | None = None          #: accuracy of guessing (percent), when known: drawn and tabled
    extra: dict[str, Any] = field(default_factory=dict)  #: caller's notes for results.json (the demo's)

    def check(self) -> None:
        """Refuse what cannot run, before anything is trained (one-line :class:`CompareError`)."""
        from ..eval.metrics import METRICS
        from ..plan import METHODS

        if not self.methods:
            raise CompareError("give at least one method")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise CompareError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise CompareError(f"a method is listed twice: {', '.join(self.methods)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise CompareError(f"seeds must be distinct and at least one: {list(self.seeds)}")
        for name, v in (("steps", self.steps), ("batch_size", self.batch_size), ("eval_batch", self.eval_batch),
                        ("max_new_tokens", self.max_new_tokens)):
            if v < 1:
                raise CompareError(f"{name} must be >= 1, got {v}")
        if self.align_steps < 0:
            raise CompareError(f"align_steps must be >= 0, got {self.align_steps}")
        if self.align_data_path and not self.align_steps:
            raise CompareError("an alignment data file needs --align-steps N (N >= 1)")
        if self.metric not in METRICS:
            raise CompareError(f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")
        if not self.tiny and not (self.vision and self.llm):
            raise CompareError("give --tiny, or --vision DIR and --llm DIR (and --convnext DIR for llava-hr)")
        if not self.tiny and "llava-hr" in self.methods and not self.convnext:
            raise CompareError("llava-hr needs --convnext DIR (its high-resolution pathway)")
        for name, p in (("data", self.data_path), ("image folder", self.image_folder),
                        ("question file", self.question_file), ("answers file", self.answers_file),
                        ("alignment data", self.align_data_path), ("vision", self.vision), ("llm", self.llm),
                        ("convnext", self.convnext)):
            if p and not Path(p).exists():
                raise CompareError(f"{name} {p}: no such file or directory")
        if self.max_visual_tokens:
            if any(b < 1 for b in self.max_visual_tokens):
                raise CompareError(f"--max-visual-tokens must be positive, got {list(self.max_visual_tokens)}")
            if not budgets_supported(self.methods):
                raise CompareError("--max-visual-tokens: token budgets are not supported yet (the planners "
                                   "take no max_visual_tokens); compare without a budget")


def budgets_supported(methods: Sequence[str]) -> bool:
    """Whether every method's planner takes a ``max_visual_tokens`` option (asked of the planners
    themselves, so budgets work here as soon as the planner has them)."""
    from ..plan import plan_image

    for m in methods:
        try:
            plan_image(m, (672, 672), max_visual_tokens=10_000)
        except TypeError:
            return False
    return True


def run_key(method: str, budget: int | None) -> str:
    """The name of a method at a budget in tables and ``results.json``."""
    return method if budget is None else f"{method}@{budget}"


def words_of(paths: Sequence[str | os.PathLike], question_file: str | os.PathLike | None = None,
             limit: int = MAX_WORDS) -> list[str]:
    """Whole words for a tiny tokenizer: the ``limit`` most frequent words of the conversations in
    ``paths``, of the questions and of the vicuna_v1 template (sorted, for a stable vocabulary)."""
    from ..data.records import load_records
    from ..data.templates import VICUNA_SYSTEM
    from ..eval.evaluate import read_records

    texts = [VICUNA_SYSTEM, "USER ASSISTANT"]
    for r in load_records([p for p in paths if p]):
        texts += [str(t.get("value", "")) for t in r.conversations]
    if question_file:
        texts += [str(q.get("text", "")) for q in read_records(question_file)]
    counts = Counter(w for t in texts for w in re.findall(r"[A-Za-z0-9]+", t))
    return sorted(w for w, _ in counts.most_common(limit))


def _fingerprint(path: str | None) -> Any:
    """What identifies a data file or model directory's content cheaply: sizes and mtimes."""
    if not path:
        return None
    p = Path(path).resolve()
    if p.is_dir():
        return [str(p)] + sorted((str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns)
                                 for f in p.rglob("*") if f.is_file())
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


def _cached(path: Path, stamp: dict[str, Any]) -> bool:
    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(stamp))
    except (OSError, json.JSONDecodeError):
        return False


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def _first_stage(method: str) -> str:
    from ..train.stages import STAGES

    return next(iter(STAGES[method]))


def _mean(values: Any) -> float:
    v = list(values)
    return float(sum(v) / len(v)) if v else float("nan")


class _Costing:
    """TFLOPs per image of a model's plans, averaged over the held-out questions' images."""

    def __init__(self, cfg: CompareConfig) -> None:
        from ..eval.evaluate import read_records
        from ..image import image_size

        folder = Path(cfg.image_folder)
        sizes = Counter()
        for q in read_records(cfg.question_file):
            if q.get("image"):
                sizes[image_size(folder / str(q["image"]))] += 1
        if not sizes:
            raise CompareError(f"{cfg.question_file}: no question has an image to cost")
        self.sizes = sizes
        self.tiny = cfg.tiny
        self.llm_params = cfg.llm_params

    def __call__(self, net: Any) -> dict[str, float]:
        from ..plan import plan_image
        from ..plan.cost import ViTShape, plan_cost

        kw: dict[str, Any] = {"llm_params": self.llm_params}
        if not self.tiny:  # a full-size model is costed with its own LLM and ViT
            kw["llm_params"] = float(sum(p.numel() for p in net.llm.parameters()))
            vc = getattr(getattr(getattr(net.visual, "vit", None), "vision_tower", None), "config", None)
            if vc is not None:
                kw["vit"] = ViTShape(width=vc.hidden_size, layers=vc.num_hidden_layers, mlp=vc.intermediate_size,
                                     patch=vc.patch_size)
        n = sum(self.sizes.values())
        parts = {"vision": 0.0, "connector": 0.0, "llm_prefill": 0.0, "total": 0.0}
        for size, count in self.sizes.items():
            t = plan_cost(plan_image(net.config.method, size, **net.config.plan_options), **kw).to_json()["tflops"]
            for k in parts:
                parts[k] += t[k] * count / n
        return parts


def _check_finished(res: Any, key: str, seed: int, what: str) -> None:
    """A stage the trainer stopped early (SIGTERM, SIGINT: it saves a checkpoint and returns) is not
    a result: stop here, so nothing is scored from a half-trained model; the next run redoes it."""
    if res.stopped_by:
        raise CompareError(f"{key} seed {seed}: {what} stopped by {res.stopped_by} at step {res.steps}; "
                           "nothing scored — run the same command again to redo this run")


def _run_one(cfg: CompareConfig, out: Path, method: str, budget: int | None, seed: int, words: list[str] | None,
             costing: _Costing, progress: bool) -> dict[str, Any]:
    """Train, predict, score and cost one method at one seed; returns its row."""
    from ..eval.evaluate import evaluate
    from ..eval.predict import load_model, predict, training_template
    from ..methods import PRESETS, build_model
    from ..model import HiresLMM
    from ..train import TrainConfig, train
    from ..train.trainer import load_trainable

    key = run_key(method, budget)
    run_dir = out / "runs" / key / f"seed-{seed}"
    stamp = {k: v for k, v in asdict(cfg).items() if k not in ("methods", "seeds", "max_visual_tokens", "chance",
                                                                "extra", "words")}
    stamp.update(method=method, budget=budget, seed=seed, words=words,
                 files={k: _fingerprint(getattr(cfg, k)) for k in ("data_path", "align_data_path", "question_file",
                                                                    "answers_file", "vision", "llm", "convnext")})
    result_file = run_dir / "result.json"
    if result_file.exists() and _cached(run_dir / "stamp.json", stamp):
        print(f"[{key} seed {seed}] reusing {run_dir}")
        return json.loads(result_file.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    needs_convnext = PRESETS[method].needs_convnext
    common = dict(method=method, image_folder=cfg.image_folder, batch_size=cfg.batch_size,
                  lr_schedule=cfg.lr_schedule, warmup_ratio=cfg.warmup_ratio, keep_last=1, seed=seed,
                  overwrite=True, progress=progress)
    t0 = time.perf_counter()
    init = run_dir / "init"
    if cfg.tiny or budget is not None:
        # the starting model is built here: a tiny one needs its words and the given encoders, a
        # budget goes into the model's plan options (the trainer's own build knows neither)
        model = build_model(method, tiny=cfg.tiny, vision=cfg.vision, llm=cfg.llm,
                            convnext=cfg.convnext if needs_convnext else None, words=words or (), seed=seed)
        if budget is not None:
            model.config.plan_options["max_visual_tokens"] = budget
        model.save_pretrained(init)
        del model
        sources: dict[str, Any] = {"init": str(init)}
    else:
        sources = {"vision": cfg.vision, "llm": cfg.llm, "convnext": cfg.convnext if needs_convnext else None}
    align_steps_done = 0
    if cfg.align_steps:
        align = run_dir / "align"
        res = train(TrainConfig(data_path=cfg.align_data_path or cfg.data_path, output_dir=str(align),
                                stage=_first_stage(method), max_steps=cfg.align_steps, lr=cfg.align_lr,
                                save_steps=cfg.align_steps, **common, **sources))
        _check_finished(res, key, seed, "alignment")
        align_steps_done = res.steps
        if "init" in sources:
            # stage 1 saved only what it trained: the main stage starts from the same model with it
            model = HiresLMM.from_pretrained(init)
            load_trainable(model, align)
            model.save_pretrained(init)
            del model
        else:
            sources["init"] = str(align)
    model_dir = run_dir / "model"
    res = train(TrainConfig(data_path=cfg.data_path, output_dir=str(model_dir), stage=cfg.stage, max_steps=cfg.steps,
                            lr=cfg.lr, template=cfg.template, save_steps=cfg.steps, **common, **sources))
    _check_finished(res, key, seed, "training")
    train_s = time.perf_counter() - t0
    shutil.rmtree(init, ignore_errors=True)
    shutil.rmtree(run_dir / "align", ignore_errors=True)
    metrics = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    answers = run_dir / "answers.jsonl"
    t = time.perf_counter()
    net, _ = load_model(model_dir)
    predict(net, cfg.question_file, cfg.image_folder, answers, batch_size=cfg.eval_batch,
            max_new_tokens=cfg.max_new_tokens, template=training_template(model_dir, net), model_id=key,
            progress=progress)
    eval_s = time.perf_counter() - t
    rep = evaluate(answers, cfg.answers_file, cfg.metric, question_file=cfg.question_file)
    tflops = costing(net)
    del net
    preds = Counter(json.loads(line).get("text", "") for line in answers.read_text().splitlines() if line.strip())
    row = {"method": method, "max_visual_tokens": budget, "seed": seed, "accuracy": 100.0 * rep["score"],
           "count": rep["count"], "errors": rep["errors"],
           "visual_tokens": _mean(m["visual_tokens_per_sample"] for m in metrics),
           "tflops": tflops["total"], "tflops_parts": tflops, "train_seconds": train_s, "eval_seconds": eval_s,
           "steps": res.steps, "align_steps": align_steps_done,
           "loss_start": _mean(m["loss"] for m in metrics[:5]), "loss_end": _mean(m["loss"] for m in metrics[-10:]),
           "predictions": dict(preds.most_common(10))}
    _write_json(result_file, row)
    _write_json(run_dir / "stamp.json", stamp)
    print(f"[{key} seed {seed}] accuracy {row['accuracy']:.1f} % on {row['count']} questions; "
          f"{row['visual_tokens']:.0f} visual tokens, {row['tflops']:.2f} TFLOPs per image; trained {train_s:.0f}s, "
          f"loss {row['loss_start']:.2f} -> {row['loss_end']:.3f}")
    return row


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One method (at one budget) over its seeds: mean accuracy and its spread (sample standard
    deviation; 0 for one seed), min, max, each seed's, and the means of the rest."""
    accs = [r["accuracy"] for r in rows]
    return {"method": rows[0]["method"], "max_visual_tokens": rows[0]["max_visual_tokens"],
            "accuracy": statistics.fmean(accs), "accuracy_spread": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "accuracy_min": min(accs), "accuracy_max": max(accs),
            "accuracy_per_seed": {str(r["seed"]): r["accuracy"] for r in rows}, "seeds": [r["seed"] for r in rows],
            "visual_tokens": statistics.fmean(r["visual_tokens"] for r in rows),
            "tflops": statistics.fmean(r["tflops"] for r in rows),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in rows),
            "count": rows[0]["count"]}


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names whose (TFLOPs, accuracy) no other point beats: none has at most their TFLOPs and
    more accuracy, or less TFLOPs and at least their accuracy. Ordered by TFLOPs."""
    best = -math.inf
    front = []
    for name, (_cost, acc) in sorted(points.items(), key=lambda kv: (kv[1][0], -kv[1][1])):
        if acc > best:
            front.append(name)
            best = acc
    return front


def _margins(methods: dict[str, dict[str, Any]], baseline: str = "llava-1.5") -> dict[str, dict[str, float]]:
    """Each method's points above ``baseline`` at the same seed: mean and the smallest."""
    if baseline not in methods:
        return {}
    base = methods[baseline]["accuracy_per_seed"]
    out = {}
    for key, m in methods.items():
        if key == baseline:
            continue
        d = [acc - base[s] for s, acc in m["accuracy_per_seed"].items() if s in base]
        if d:
            out[key] = {"mean": statistics.fmean(d), "min": min(d)}
    return out


def run_compare(cfg: CompareConfig, out: str | os.PathLike, *, fresh: bool = False, progress: bool = True,
                on_run: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the comparison into ``out``; returns what ``OUT/results.json`` holds.

    ``results.json``: ``{"methods": {name: {"accuracy": percent (mean over seeds),
    "accuracy_spread", "accuracy_min", "accuracy_max", "accuracy_per_seed", "visual_tokens": mean
    per image, "tflops": per image, "train_seconds", ...}}, "settings": {...}, "pareto": [names],
    "margin_over_llava15": {...}, "runs": [each run's row], ...}``; plus ``results.md`` and the
    figure ``accuracy-tflops.png`` (:mod:`.report`).
    """
    from .report import write_report

    cfg.check()
    out = Path(out)
    if fresh and (out / "runs").exists():
        shutil.rmtree(out / "runs")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        costing = _Costing(cfg)
        words = None
        if cfg.tiny and cfg.llm is None:  # a tiny LLM directory brings its own tokenizer
            words = list(cfg.words) if cfg.words is not None else words_of(
                [cfg.data_path, cfg.align_data_path], cfg.question_file)
    except (OSError, ValueError) as e:
        if isinstance(e, HiresError):
            raise
        raise CompareError(one_line(e)) from None
    budgets: list[int | None] = list(cfg.max_visual_tokens) or [None]
    rows = []
    for method in cfg.methods:
        for budget in budgets:
            for seed in cfg.seeds:
                row = _run_one(cfg, out, method, budget, seed, words, costing, progress)
                rows.append(row)
                if on_run is not None:
                    on_run(row)
    methods: dict[str, dict[str, Any]] = {}
    for row in rows:
        methods.setdefault(run_key(row["method"], row["max_visual_tokens"]), []).append(row)  # type: ignore[arg-type]
    methods = {k: aggregate(v) for k, v in methods.items()}  # type: ignore[arg-type]
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("words", "extra")}
    settings["cost_model"] = ("tiny models costed at full size: CLIP ViT-L/14, ConvNeXt-L, "
                              f"an LLM of {cfg.llm_params:g} parameters" if cfg.tiny else
                              "the models' own ViT and LLM sizes, ConvNeXt-L")
    results = {"methods": methods, "settings": settings,
               "pareto": pareto_front({k: (m["tflops"], m["accuracy"]) for k, m in methods.items()}),
               "margin_over_llava15": _margins(methods), "chance": cfg.chance,
               "total_seconds": time.perf_counter() - t0, "runs": rows, **cfg.extra}
    write_report(out, results)
    return results
