"""Train several methods with the same budget on the same data, score them, set them against
their compute.

A method is a preset name or a method file (JSON/YAML, :func:`hires_lmm.parts.resolve_method`):
it is named in the results by its spec's name (a file's stem, or its ``"name"``); every method is
planned, costed, built and trained through its spec (:class:`MethodEntry`). For each method, each
token budget (``max_visual_tokens``: every method plans within each, :mod:`hires_lmm.plan.budget`;
one that cannot for a held-out image is refused before anything trains) and each seed, one *run*:

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

Every run is cached under ``OUT/runs/<method>[@<budget>]/seed-<s>`` with the settings, data files
and method file (its content) that made it, so an interrupted comparison resumes where it stopped
and an edited method file is trained again (``fresh`` starts over).
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
from typing import TYPE_CHECKING, Any

from ..errors import HiresError, one_line

if TYPE_CHECKING:
    from ..parts import MethodSpec

__all__ = ["CompareConfig", "CompareError", "MethodEntry", "aggregate", "budgets_supported", "pareto_front",
           "resolve_methods", "run_compare", "run_key", "words_of"]


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
    methods: tuple[str, ...]             #: preset names or method files (JSON / YAML)
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

    def check(self) -> list[MethodEntry]:
        """Refuse what cannot run, before anything is trained (one-line :class:`CompareError`);
        returns the resolved methods."""
        from ..eval.metrics import METRICS

        if not self.methods:
            raise CompareError("give at least one method")
        if len(set(self.methods)) != len(self.methods):
            raise CompareError(f"a method is listed twice: {', '.join(self.methods)}")
        entries = resolve_methods(self.methods)
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
        if self.align_steps:
            bare = [e.name for e in entries if not e.spec.recipe()]
            if bare:
                raise CompareError(f"--align-steps: {bare[0]} has no paper stages to align with (give its method "
                                   "file a \"recipes\" or a \"base\")")
        if self.metric not in METRICS:
            raise CompareError(f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")
        if not self.tiny and not (self.vision and self.llm):
            raise CompareError("give --tiny, or --vision DIR and --llm DIR (and --convnext DIR for llava-hr)")
        hr = next((e.name for e in entries if e.spec.needs_convnext()), None)
        if not self.tiny and hr is not None and not self.convnext:
            raise CompareError(f"{hr} needs --convnext DIR (its high-resolution pathway)")
        for name, p in (("data", self.data_path), ("image folder", self.image_folder),
                        ("question file", self.question_file), ("answers file", self.answers_file),
                        ("alignment data", self.align_data_path), ("vision", self.vision), ("llm", self.llm),
                        ("convnext", self.convnext)):
            if p and not Path(p).exists():
                raise CompareError(f"{name} {p}: no such file or directory")
        if self.max_visual_tokens:
            if any(b < 1 for b in self.max_visual_tokens):
                raise CompareError(f"--max-visual-tokens must be positive, got {list(self.max_visual_tokens)}")
            if len(set(self.max_visual_tokens)) != len(self.max_visual_tokens):
                raise CompareError(f"--max-visual-tokens: a budget is listed twice: {list(self.max_visual_tokens)}")
            if not budgets_supported([e.spec for e in entries]):
                raise CompareError("--max-visual-tokens: token budgets are not supported yet (the planners "
                                   "take no max_visual_tokens); compare without a budget")
        return entries


@dataclass(frozen=True)
class MethodEntry:
    """One compared method, resolved.

    Attributes:
        name: its name in results.json, the table, the figure and ``OUT/runs`` (the spec's: a
            preset's name, a method file's ``"name"`` or stem).
        method: what the model builder and the trainer are given: the preset name, or the
            method file's absolute path.
        spec: its :class:`~hires_lmm.parts.MethodSpec` (plan, cost, recipe, encoders).
        file_text: a method file's content (part of the runs' cache stamp), None for a preset.
    """

    name: str
    method: str
    spec: MethodSpec
    file_text: str | None = None


#: what a method's name may be: it names a directory under OUT/runs
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def resolve_methods(methods: Sequence[str]) -> list[MethodEntry]:
    """Each preset name or method file's :class:`MethodEntry`; a bad file, an unknown name or two
    methods of the same name are refused (one-line :class:`CompareError`)."""
    from ..parts import PartError, is_method_file, resolve_method

    entries: list[MethodEntry] = []
    for m in methods:
        try:
            spec = resolve_method(m)
        except PartError as e:
            raise CompareError(one_line(e)) from None
        if is_method_file(m):
            path = Path(m).resolve()
            entry = MethodEntry(spec.name, str(path), spec, path.read_text(encoding="utf-8"))
        else:
            entry = MethodEntry(spec.name, m, spec)
        if not _NAME.fullmatch(entry.name):
            raise CompareError(f"{m}: method name {entry.name!r} cannot name a run directory (letters, digits, "
                               "'.', '_', '+', '-'); give the file another \"name\"")
        twin = next((e for e in entries if e.name == entry.name), None)
        if twin is not None:
            raise CompareError(f"two methods are named {entry.name!r} ({Path(twin.method).name if twin.file_text else twin.method}, "
                               f"{Path(m).name}): give a method file another \"name\"")
        entries.append(entry)
    return entries


def budgets_supported(methods: Sequence[str | MethodSpec]) -> bool:
    """Whether every method plans within a ``max_visual_tokens`` budget: a preset when its
    planner takes the option (asked of the views part, i.e. of the planner's signature), a
    composed method always (:meth:`~hires_lmm.parts.MethodSpec.plan` chooses among its planner's
    configurations by the composed count)."""
    from ..parts import get_part, resolve_method

    for m in methods:
        spec = resolve_method(m)
        if spec.is_preset_parts() and "max_visual_tokens" not in get_part("views", spec.parts["views"]).option_keys():
            return False
    return True


def run_key(method: str, budget: int | None) -> str:
    """The name of a method at a budget in tables and ``results.json``."""
    return method if budget is None else f"{method}@{budget}"


def words_of(paths: Sequence[str | os.PathLike | None], question_file: str | os.PathLike | None = None,
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


def _first_stage(entry: MethodEntry) -> str:
    """The method's first paper stage (its spec's recipe; :meth:`CompareConfig.check` refused a
    method without one)."""
    return next(iter(entry.spec.recipe()))


def _load_first_stage(model: Any, align: Path, entry: MethodEntry) -> None:
    """Load what the alignment stage trained (``trainable.safetensors``) into ``model``.

    A preset goes through :func:`~hires_lmm.train.trainer.load_trainable` (which checks the
    stage was trained for ``model.config.method``). A method file's stage records the file's path
    as its method while the model's config names its planner: the keys and shapes are checked
    here instead (the stage was trained in this very run directory, from this model).
    """
    from ..train.errors import TrainingError
    from ..train.trainer import load_trainable

    if entry.file_text is None:
        load_trainable(model, align)
        return
    from safetensors.torch import load_file

    state = load_file(align / "trainable.safetensors")
    own = model.state_dict()
    bad = sorted(k for k, v in state.items() if k not in own or v.shape != own[k].shape)
    if bad:
        raise TrainingError(f"{align}: weights not in this {entry.name} model, or of other shapes: {bad[:10]}")
    model.load_state_dict(state, strict=False)


def _mean(values: Any) -> float:
    v = list(values)
    return float(sum(v) / len(v)) if v else float("nan")


class _Costing:
    """TFLOPs per image of a model's plans, averaged over the held-out questions' images."""

    def __init__(self, cfg: CompareConfig) -> None:
        from ..eval.evaluate import read_records
        from ..image import image_size

        folder = Path(cfg.image_folder)
        sizes: Counter[tuple[int, int]] = Counter()
        for q in read_records(cfg.question_file):
            if q.get("image"):
                sizes[image_size(folder / str(q["image"]))] += 1
        if not sizes:
            raise CompareError(f"{cfg.question_file}: no question has an image to cost")
        self.sizes = sizes
        self.tiny = cfg.tiny
        self.llm_params = cfg.llm_params

    def __call__(self, net: Any) -> dict[str, float]:
        """The mean TFLOPs per held-out image: the cost model of the model's own spec's plan of
        each image (a composed method's count and compressor; the model's budget), as ``hires
        cost`` reports it."""
        from ..parts import spec_from_config
        from ..plan.cost import ViTShape

        kw: dict[str, Any] = {"llm_params": self.llm_params}
        if not self.tiny:  # a full-size model is costed with its own LLM and ViT
            kw["llm_params"] = float(sum(p.numel() for p in net.llm.parameters()))
            vc = getattr(getattr(getattr(net.visual, "vit", None), "vision_tower", None), "config", None)
            if vc is not None:
                kw["vit"] = ViTShape(width=vc.hidden_size, layers=vc.num_hidden_layers, mlp=vc.intermediate_size,
                                     patch=vc.patch_size)
        spec = spec_from_config(net.config)  # its views options are the config's plan_options
        n = sum(self.sizes.values())
        parts = {"vision": 0.0, "connector": 0.0, "llm_prefill": 0.0, "total": 0.0}
        for size, count in self.sizes.items():
            t = spec.cost_of(spec.plan(size), **kw).to_json()["tflops"]
            for k in parts:
                parts[k] += t[k] * count / n
        return parts

    def check_budgets(self, entries: Sequence[MethodEntry], budgets: Sequence[int]) -> None:
        """Refuse, before anything trains, a method that cannot plan a held-out image within a
        budget (a fixed count over it: INF-LLaVA, LLaVA-1.5 under 576)."""
        from ..plan.budget import BudgetError

        for e in entries:
            for b in budgets:
                for size in self.sizes:
                    try:
                        e.spec.plan(size, max_visual_tokens=b)
                    except BudgetError as err:
                        raise CompareError(f"{e.name} at --max-visual-tokens {b}: {one_line(err)}") from None


def _check_finished(res: Any, key: str, seed: int, what: str) -> None:
    """A stage the trainer stopped early (SIGTERM, SIGINT: it saves a checkpoint and returns) is not
    a result: stop here, so nothing is scored from a half-trained model; the next run redoes it."""
    if res.stopped_by:
        raise CompareError(f"{key} seed {seed}: {what} stopped by {res.stopped_by} at step {res.steps}; "
                           "nothing scored — run the same command again to redo this run")


def _run_one(cfg: CompareConfig, out: Path, entry: MethodEntry, budget: int | None, seed: int,
             words: list[str] | None, costing: _Costing, progress: bool) -> dict[str, Any]:
    """Train, predict, score and cost one method at one budget and seed; returns its row."""
    from ..eval.evaluate import evaluate
    from ..eval.predict import load_model, predict, training_template
    from ..methods import build_model
    from ..model import HiresLMM
    from ..train import TrainConfig, train

    method = entry.method
    key = run_key(entry.name, budget)
    run_dir = out / "runs" / key / f"seed-{seed}"
    stamp = {k: v for k, v in asdict(cfg).items() if k not in ("methods", "seeds", "max_visual_tokens", "chance",
                                                                "extra", "words")}
    stamp.update(method=entry.name, budget=budget, seed=seed, words=words,
                 files={k: _fingerprint(getattr(cfg, k)) for k in ("data_path", "align_data_path", "question_file",
                                                                    "answers_file", "vision", "llm", "convnext")})
    if entry.file_text is not None:  # editing the method file redoes its runs
        stamp["method_file"] = entry.file_text
    result_file = run_dir / "result.json"
    if result_file.exists() and _cached(run_dir / "stamp.json", stamp):
        print(f"[{key} seed {seed}] reusing {run_dir}")
        return dict(json.loads(result_file.read_text()))
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    needs_convnext = entry.spec.needs_convnext()
    common: dict[str, Any] = dict(method=method, image_folder=cfg.image_folder, batch_size=cfg.batch_size,
                                  lr_schedule=cfg.lr_schedule, warmup_ratio=cfg.warmup_ratio, keep_last=1, seed=seed,
                                  overwrite=True, progress=progress)
    t0 = time.perf_counter()
    init = run_dir / "init"
    if cfg.tiny or budget is not None or (cfg.align_steps and entry.file_text is not None):
        # the starting model is built here: a tiny one needs its words and the given encoders, a
        # budget goes into the model's plan options (the trainer's own build knows neither); a
        # method file's alignment output is loaded here too (_load_first_stage: the trainer's
        # --init compares the stage's method, the file's path, with the config's planner name)
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
                                stage=_first_stage(entry), max_steps=cfg.align_steps, lr=cfg.align_lr,
                                save_steps=cfg.align_steps, **common, **sources))
        _check_finished(res, key, seed, "alignment")
        align_steps_done = res.steps
        if "init" in sources:
            # stage 1 saved only what it trained: the main stage starts from the same model with it
            model = HiresLMM.from_pretrained(init)
            _load_first_stage(model, align, entry)
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
    row = {"method": entry.name, "max_visual_tokens": budget, "seed": seed, "accuracy": 100.0 * rep["score"],
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

    entries = cfg.check()
    out = Path(out)
    budgets: list[int | None] = list(cfg.max_visual_tokens) or [None]
    t0 = time.perf_counter()
    try:
        costing = _Costing(cfg)
        if cfg.max_visual_tokens:
            costing.check_budgets(entries, cfg.max_visual_tokens)
        words = None
        if cfg.tiny and cfg.llm is None:  # a tiny LLM directory brings its own tokenizer
            words = list(cfg.words) if cfg.words is not None else words_of(
                [cfg.data_path, cfg.align_data_path], cfg.question_file)
    except (OSError, ValueError) as e:
        if isinstance(e, HiresError):
            raise
        raise CompareError(one_line(e)) from None
    if fresh and (out / "runs").exists():
        shutil.rmtree(out / "runs")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in entries:
        for budget in budgets:
            for seed in cfg.seeds:
                row = _run_one(cfg, out, entry, budget, seed, words, costing, progress)
                rows.append(row)
                if on_run is not None:
                    on_run(row)
    by_key: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault(run_key(row["method"], row["max_visual_tokens"]), []).append(row)
    methods = {k: aggregate(v) for k, v in by_key.items()}
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("words", "extra")}
    settings["method_files"] = {e.name: e.method for e in entries if e.file_text is not None}
    settings["cost_model"] = ("tiny models costed at full size: CLIP ViT-L/14, ConvNeXt-L, "
                              f"an LLM of {cfg.llm_params:g} parameters" if cfg.tiny else
                              "the models' own ViT and LLM sizes, ConvNeXt-L")
    results = {"methods": methods, "settings": settings,
               "pareto": pareto_front({k: (m["tflops"], m["accuracy"]) for k, m in methods.items()}),
               "margin_over_llava15": _margins(methods), "chance": cfg.chance,
               "total_seconds": time.perf_counter() - t0, "runs": rows, **cfg.extra}
    write_report(out, results)
    return results
