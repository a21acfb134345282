"""Answer a LLaVA question file with a model: batched, resumable, shardable.

Formats (those of haotian-liu/LLaVA's ``llava/eval/model_vqa_loader.py``), JSONL both ways:

* questions: ``{"question_id", "image", "text"}`` (``image`` relative to ``image_folder``;
  a question without ``image`` is asked text-only; other fields are ignored);
* answers: ``{"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {}}``,
  ``prompt`` being the question text as given.

As in ``model_vqa_loader``, the prompt is ``"<image>\\n" + question`` (here only when the question
does not already hold ``<image>``), wrapped in the chat template the model was trained with.

Resuming: answers already in ``answers_file`` are kept and their questions skipped; new answers
are appended and flushed after every batch, so an interrupted run loses at most the batch in
flight. A last line cut off mid-write is dropped when the file is reopened.

Order: questions whose images splice to the same number of tokens are batched together
(:func:`group_by_length_order`: no padding, the faster attention kernel), so answers are written
in that order; ``group_by_length=False`` (``hires predict --file-order``) keeps file order.

Sharding: shard ``k`` of ``n`` answers questions ``k, k + n, k + 2n, …`` (in file order);
:func:`resolve_shard` takes ``RANK``/``WORLD_SIZE`` from torchrun when they are not given.
Each shard should write its own answers file (the CLI names them ``A.shard{k}-of-{n}.jsonl``);
:func:`~.evaluate.evaluate` takes all of them at once.

Bad inputs: a question whose image cannot be loaded (missing, empty, truncated, not an image, too
large) or whose ``<image>`` placeholders do not match its image does not stop the run; it gets an
answer record with ``"text": ""`` and an ``"error"`` field naming the problem, which
:func:`~.evaluate.evaluate` counts as wrong and reports. ``retry_errors=True`` asks such
questions again on the next run (e.g. after the image was fixed). Errors of the model itself are
not caught.

Visual-token budget: ``max_visual_tokens=B`` plans every image with the budget (the planners'
``max_visual_tokens``, see docs/methods.md "Visual-token budget") instead of the saved config's
value; an image that no faithful plan fits within ``B`` is recorded as an error answer
(``"BudgetError: ..."``) like an unreadable one.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model import HiresLMM

DEFAULT_TEMPLATE = "vicuna_v1"
IMAGE_PLACEHOLDER = "<image>"

PathLike = str | os.PathLike


@dataclass
class PredictResult:
    """What a :func:`predict` call did.

    Attributes:
        answers_file: where the answers are.
        shard, num_shards: the part of the question file this call answered.
        total: questions in this shard.
        skipped: of those, already answered in ``answers_file`` (resumed).
        written: answer records appended by this call (errors included).
        errors: of those, records with an ``"error"`` field.
        template: the chat template used.
    """

    answers_file: str
    shard: int
    num_shards: int
    total: int
    skipped: int
    written: int
    errors: int
    template: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def resolve_shard(num_shards: int | None = None, shard: int | None = None,
                  env: dict[str, str] | None = None) -> tuple[int, int]:
    """``(num_shards, shard)``: the given values, else torchrun's ``WORLD_SIZE``/``RANK``, else
    ``(1, 0)``. Raises ValueError unless ``0 <= shard < num_shards``."""
    environ: Mapping[str, str] = os.environ if env is None else env
    if num_shards is None:
        num_shards = int(environ.get("WORLD_SIZE", 1))
    if shard is None:
        shard = int(environ.get("RANK", 0)) if num_shards > 1 else 0
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} of {num_shards}: need num_shards >= 1 and 0 <= shard < num_shards")
    return num_shards, shard


def shard_path(answers_file: PathLike, num_shards: int, shard: int) -> Path:
    """The answers file of one shard: ``{shard}``/``{num_shards}`` in the name are filled in;
    otherwise, with more than one shard, ``A.jsonl`` becomes ``A.shard{k}-of-{n}.jsonl``."""
    s = str(answers_file)
    if "{shard}" in s or "{num_shards}" in s:
        return Path(s.format(shard=shard, num_shards=num_shards))
    p = Path(s)
    if num_shards == 1:
        return p
    return p.with_name(f"{p.stem}.shard{shard}-of-{num_shards}{p.suffix or '.jsonl'}")


def read_questions(question_file: PathLike) -> list[dict[str, Any]]:
    """Questions of a LLaVA question file (JSONL, or a JSON list); ids must be unique."""
    from .evaluate import read_records

    qs = read_records(question_file)
    seen: set[str] = set()
    for n, q in enumerate(qs, 1):
        if "question_id" not in q or "text" not in q:
            raise ValueError(f"{question_file}: question {n} lacks question_id or text")
        k = str(q["question_id"])
        if k in seen:
            raise ValueError(f"{question_file}: question_id {q['question_id']!r} appears twice "
                             "(ids must be unique for answers to be matched and resumed)")
        seen.add(k)
    return qs


def load_existing(answers_file: PathLike, retry_errors: bool = False) -> set[str]:
    """Ids answered in ``answers_file`` (as strings). Lines that are not JSON objects (a line cut
    off by an interruption) and, with ``retry_errors``, error records are removed from the file
    (rewritten atomically) so that appending continues a well-formed file."""
    p = Path(answers_file)
    if not p.exists():
        return set()
    keep: list[str] = []
    done: set[str] = set()
    dropped = 0
    with open(p, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and "question_id" in rec
            except json.JSONDecodeError:
                ok = False
            if not ok or (retry_errors and rec.get("error")):
                dropped += bool(line.strip())
                continue
            done.add(str(rec["question_id"]))
            keep.append(line if line.endswith("\n") else line + "\n")
    if dropped or (keep and not p.read_bytes().endswith(b"\n")):
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, p)
    return done


def training_template(model_dir: PathLike | None, model: HiresLMM | None = None) -> str | None:
    """The chat template a model was trained with, when recorded: a ``template`` entry of its
    config, else ``train_config.json`` next to it (its ``template``, or its stage's default)."""
    name = getattr(getattr(model, "config", None), "template", None) if model is not None else None
    if name:
        return str(name)
    if model_dir is None:
        return None
    cfg_file = Path(model_dir) / "train_config.json"
    if not cfg_file.exists():
        return None
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if cfg.get("template"):
        return str(cfg["template"])
    if cfg.get("method") and cfg.get("stage"):
        from ..train.stages import get_stage

        try:
            return get_stage(cfg["method"], str(cfg["stage"])).template
        except ValueError:
            return None
    return None


def load_model(model: PathLike | HiresLMM, device: str | None = None, torch_dtype: Any = None) -> tuple[HiresLMM, str | None]:
    """``(model, its directory or None)``; a directory is loaded onto ``device`` (default: the
    process's GPU when there is one — ``LOCAL_RANK`` under torchrun — else the CPU)."""
    from ..model import HiresLMM

    if isinstance(model, HiresLMM):
        return model.eval(), None
    import torch

    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return HiresLMM.from_pretrained(model, device=device, torch_dtype=torch_dtype), str(model)


def build_prompt(question: dict[str, Any]) -> str:
    """The user turn: ``"<image>\\n" + text`` when the question has an image and its text has no
    ``<image>`` (LLaVA's ``model_vqa_loader``), else the text as it is."""
    text = str(question["text"])
    if question.get("image") and IMAGE_PLACEHOLDER not in text:
        return IMAGE_PLACEHOLDER + "\n" + text
    return text


def predict(model: PathLike | HiresLMM, question_file: PathLike, image_folder: PathLike, answers_file: PathLike, *,
            batch_size: int = 8, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
            template: str | None = None, num_shards: int = 1, shard: int = 0, progress: bool = True,
            model_id: str | None = None, seed: int | None = 0, retry_errors: bool = False,
            device: str | None = None, fast_decode: bool = False, max_visual_tokens: int | None = None,
            on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
            group_by_length: bool = True) -> PredictResult:
    """Answer the questions of shard ``shard`` of ``num_shards`` into ``answers_file`` (JSONL).

    Args:
        model: a model directory (:meth:`HiresLMM.save_pretrained`) or a loaded model.
        question_file: LLaVA questions ``{"question_id", "image", "text"}`` (JSONL or JSON list).
        image_folder: the directory the ``image`` paths are relative to.
        answers_file: JSONL output; existing answers are kept and their questions skipped.
        batch_size: questions per :meth:`HiresLMM.generate` call.
        max_new_tokens, temperature, top_p, seed: decoding (temperature 0: greedy).
        template: chat template (default: the model's training template when recorded, see
            :func:`training_template`, else ``vicuna_v1``).
        num_shards, shard: answer questions ``shard, shard + num_shards, …`` only.
        progress: a tqdm bar over this shard's remaining questions.
        model_id: the answers' ``model_id`` (default: the model directory's name, else the method).
        retry_errors: ask questions whose earlier answer is an error record again.
        device: where a model directory is loaded (default: GPU if available).
        fast_decode: decode large images reduced (:func:`hires_lmm.model.prepare_image`'s ``fast``).
        max_visual_tokens: the visual-token budget every image is planned with (set in the model's
            ``config.plan_options`` for this call); None: the saved config's value, if any. An
            image no plan fits is recorded as an error answer. Not a positive integer: BudgetError.
        on_batch: called with each batch's records after they are written (for tests, logging).
        group_by_length: batch questions of equal spliced length together (see
            :func:`group_by_length_order`); answers are then written in that order, not file order.

    Bad images are recorded as error answers, not raised (see the module doc).
    """
    from ..plan.budget import check_budget

    if max_visual_tokens is not None:
        max_visual_tokens = check_budget(max_visual_tokens)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} of {num_shards}: need num_shards >= 1 and 0 <= shard < num_shards")
    questions = read_questions(question_file)[shard::num_shards]
    net, model_dir = load_model(model, device)
    saved_options = net.config.plan_options
    if max_visual_tokens is not None:  # a new dict: a model passed in gets its own back at the end
        net.config.plan_options = {**(saved_options or {}), "max_visual_tokens": max_visual_tokens}
    try:
        return _predict(net, model_dir, questions, question_file, image_folder, answers_file, batch_size=batch_size,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, template=template,
                        num_shards=num_shards, shard=shard, progress=progress, model_id=model_id, seed=seed,
                        retry_errors=retry_errors, fast_decode=fast_decode, on_batch=on_batch,
                        recorded=recorded_errors(), group_by_length=group_by_length)
    finally:
        net.config.plan_options = saved_options


def recorded_errors() -> tuple[type[BaseException], ...]:
    """What :func:`predict` records as a question's error answer when preparing its image raises
    it: unreadable images (missing, not an image, corrupt, too large) and budget refusals."""
    from ..image import ImageLoadError
    from ..plan.budget import BudgetError

    return ImageLoadError, OSError, BudgetError


def _predict(net: HiresLMM, model_dir: str | None, questions: list[dict[str, Any]], question_file: PathLike,
             image_folder: PathLike, answers_file: PathLike, *, batch_size: int, max_new_tokens: int,
             temperature: float, top_p: float, template: str | None, num_shards: int, shard: int, progress: bool,
             model_id: str | None, seed: int | None, retry_errors: bool, fast_decode: bool,
             on_batch: Callable[[list[dict[str, Any]]], None] | None,
             recorded: tuple[type[BaseException], ...], group_by_length: bool) -> PredictResult:
    """The loop of :func:`predict` over a loaded model; exceptions of ``recorded`` raised while
    preparing a question's image become its error answer."""
    template = template or training_template(model_dir, net) or DEFAULT_TEMPLATE
    if model_id is None:
        model_id = Path(model_dir).name if model_dir else net.config.method
    out = Path(answers_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = load_existing(out, retry_errors=retry_errors)
    todo = [q for q in questions if str(q["question_id"]) not in done]
    folder = Path(image_folder)
    if group_by_length and batch_size > 1:
        todo = group_by_length_order(net, todo, folder, unreadable=recorded)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"predict {Path(question_file).name}"
                   + (f" [{shard}/{num_shards}]" if num_shards > 1 else ""), unit="q")
    written = errors = 0
    with open(out, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            records: list[dict[str, Any] | None] = [None] * len(batch)
            prompts, images, slots = [], [], []
            for i, q in enumerate(batch):
                prompt = build_prompt(q)
                try:
                    ims = [net.prepare_image(folder / str(q["image"]), fast=fast_decode)] if q.get("image") else []
                except recorded as e:  # unreadable image, over the budget: recorded, not raised
                    records[i] = _record(q, "", model_id, error=f"{type(e).__name__}: {e}")
                    continue
                if prompt.count(IMAGE_PLACEHOLDER) != len(ims):
                    records[i] = _record(q, "", model_id, error=f"PlaceholderMismatch: the question has "
                                         f"{prompt.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholder(s) "
                                         f"for {len(ims)} image(s)")
                    continue
                prompts.append(prompt)
                images.append(ims)
                slots.append(i)
            if prompts:
                texts = net.generate(prompts, images, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, seed=seed, template=template)
                for i, t in zip(slots, texts):
                    records[i] = _record(batch[i], t.strip(), model_id)
            recs = [r for r in records if r is not None]
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
            f.flush()
            os.fsync(f.fileno())
            written += len(recs)
            errors += sum(1 for r in recs if "error" in r)
            if on_batch is not None:
                on_batch(recs)
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    if errors and progress:
        print(f"predict: {errors} question(s) recorded as errors (see the 'error' field in {out})", file=sys.stderr)
    return PredictResult(str(out), shard, num_shards, len(questions), len(questions) - len(todo), written, errors, template)


def group_by_length_order(net: HiresLMM, questions: list[dict[str, Any]], image_folder: Path, *,
                          unreadable: tuple[type[BaseException], ...] | None = None) -> list[dict[str, Any]]:
    """``questions`` reordered so that consecutive questions (so each batch, where it can) have
    one spliced length: sorted by (visual tokens of the image, as planned from its header; the
    question's characters), stable, so equal keys keep file order.

    Why: a batch of unequal lengths is left-padded, and the padding mask sends the prefill's
    attention to SDPA's masked kernel; a batch without padding takes the causal kernel, 3-6x faster
    on the CPU (a 16-question batch of the demo's llava-next: 0.43 s against 1.3-2.7 s). Greedy
    answers do not depend on the batch. Questions whose image header raises one of
    ``unreadable`` (default: :func:`recorded_errors`) sort first; their
    error is recorded when the batch prepares them, as without grouping. Each header is read here
    and again when the batch prepares the image (a header read, small beside the decode).
    """
    from ..data.records import VisualTokenCounter
    from ..image import image_size

    unreadable = recorded_errors() if unreadable is None else unreadable
    counter = VisualTokenCounter.of(net)

    def key(q: dict[str, Any]) -> tuple[int, int]:
        n = 0
        if q.get("image"):
            try:
                n = counter(image_size(image_folder / str(q["image"])))
            except unreadable:
                n = -1
        return n, len(str(q.get("text", "")))

    return sorted(questions, key=key)


def _record(question: dict[str, Any], text: str, model_id: str, error: str | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"question_id": question["question_id"], "prompt": str(question["text"]), "text": text,
                           "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}
    if error is not None:
        rec["error"] = error
    return rec


def merge_answers(paths: Sequence[PathLike], out: PathLike) -> int:
    """Concatenate shard answer files into one (later duplicates dropped); returns the count."""
    from .evaluate import read_records

    seen: set[str] = set()
    lines = []
    for p in paths:
        for rec in read_records(p):
            k = str(rec.get("question_id"))
            if k not in seen:
                seen.add(k)
                lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    Path(out).write_text("".join(lines), encoding="utf-8")
    return len(lines)


__all__ = ["DEFAULT_TEMPLATE", "PredictResult", "build_prompt", "load_existing", "load_model", "merge_answers",
           "predict", "read_questions", "resolve_shard", "shard_path", "training_template"]
