"""LLaVA training records: loading (JSON, JSONL, LLaVA-NeXT YAML mixtures) and validation.

A record is ``{"id", "image" | "images", "conversations": [{"from", "value"}, ...]}``; ``image``
may be one path or a list (LLaVA-NeXT), ``images`` a list; no image makes a text-only record.
Loading applies LLaVA's placeholder convention: a record with images but no ``<image>`` in any turn
gets one ``"<image>\\n"`` per image prepended to its first human turn. Any other disagreement
between placeholders and images is a problem of that record.

:func:`validate` finds, before training, every record that would fail or mislead it (missing,
corrupt or truncated images, unknown roles, placeholder/image mismatches, template errors,
tokenization mismatches, sequences longer than ``max_length`` with the visual tokens counted from
the method's plan) and names each by id and file.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from transformers import PreTrainedTokenizerBase

from ..errors import HiresError, one_line
from ..image import ImageLoadError, image_size, load_image
from ..plan import plan_image
from ..plan.budget import BudgetError
from ..text import IMAGE_TOKEN
from .templates import IGNORE_INDEX, ROLES, ChatTemplate, get_template

#: LLaVA-NeXT's sampling strategies (``sampling_strategy`` in the data YAML).
STRATEGIES = ("all", "first", "end", "random")


class DataError(HiresError, ValueError):
    """Training data that cannot be used; the message names the file (and record)."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file (or one a YAML mixture names) does not exist."""


class RecordError(DataError):
    """Bad records; ``problems`` lists every ``(record_id, source, message)``."""

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass
class Record:
    """One training sample.

    Attributes:
        id: the record's ``id`` (as a string), or ``"<file name>#<index>"`` when it has none.
        images: image paths as written in the file (relative to the image folder, or absolute).
        conversations: ``[{"from": "human"|"gpt"|"system", "value": str}, ...]`` after the
            placeholder convention (a copy; the loaded data is not modified).
        source: the data file it came from.
        index: its position in that file (before any sampling).
        problems: what was wrong with its fields when loaded (reported by :func:`check_record`).
        auto_id: the id was made up from the file and index (the record had none): such ids are
            unique per file, so :func:`validate` does not report them as duplicates.
        unreadable: a JSONL line that is not UTF-8 or not JSON (its problem names the line).
    """

    id: str
    images: list[str]
    conversations: list[dict[str, Any]]
    source: str = ""
    index: int = 0
    problems: list[str] = field(default_factory=list, repr=False)
    auto_id: bool = field(default=False, repr=False)
    unreadable: bool = field(default=False, repr=False)


class Problem(NamedTuple):
    """A bad record: its id, its file, and what is wrong."""

    record_id: str
    source: str
    message: str

    def __str__(self) -> str:
        return f"record {self.record_id!r} ({self.source}): {self.message}"


def _format_problems(problems: Sequence[Problem], total_records: int | None, limit: int = 20) -> str:
    bad = len({(p.record_id, p.source) for p in problems})
    of = f" of {total_records}" if total_records is not None else ""
    lines = [f"{bad} bad record(s){of}, {len(problems)} problem(s):"]
    lines += [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


# --- loading -------------------------------------------------------------------------------------

class BadLine(NamedTuple):
    """A JSONL line that is not a record: kept in its place so that it becomes a bad record
    (reported by id and file, skipped by ``--skip-bad``) instead of refusing the whole file."""

    lineno: int
    message: str


def _read_json_lines(path: Path, data: bytes) -> list[Any]:
    """Objects of a JSONL file, one per non-blank line; a line that is not UTF-8 or not JSON
    becomes a :class:`BadLine` naming its line number."""
    out: list[Any] = []
    # split on "\n" only, on the bytes: str.splitlines would also split inside a JSON string at
    # U+2028 and friends, and one undecodable line must not make the others unreadable
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM is not JSON
        except UnicodeDecodeError as e:
            out.append(BadLine(lineno, f"line {lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line)"))
            continue
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            out.append(BadLine(lineno, f"line {lineno}: malformed JSON at column {e.colno}: {e.msg}"))
    return out


def _read_json_list(path: Path) -> list[Any]:
    """Records of a JSON list file or a JSONL file (one object per line; blank lines skipped;
    a broken line is a :class:`BadLine` in its place)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataFileNotFoundError(f"data file {str(path)!r}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"data file {str(path)!r}: is a directory") from None
    except OSError as e:
        raise DataError(f"data file {str(path)!r}: cannot read it ({e.strerror or e})") from None
    if path.suffix.lower() == ".jsonl":
        return _read_json_lines(path, data)
    try:
        text = data.decode("utf-8-sig")  # a BOM is not JSON
    except UnicodeDecodeError as e:
        if data.lstrip().startswith(b"{"):  # JSON lines in a .json file: read line by line
            return _read_json_lines(path, data)
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"data file {str(path)!r}: not UTF-8 text at line {line} ({e.reason})") from None
    stripped = text.lstrip()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        if not (e.msg.startswith("Extra data") and stripped.startswith("{")):
            raise DataError(f"data file {str(path)!r}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        return _read_json_lines(path, data)  # one object per line in a .json file: read it as JSONL
    if isinstance(parsed, dict) and stripped.startswith("{") and "conversations" in parsed:
        return [parsed]
    if not isinstance(parsed, list):
        raise DataError(f"data file {str(path)!r}: expected a JSON list of records, got {type(parsed).__name__}")
    return parsed


def _image_list(raw: Mapping[str, Any], problems: list[str]) -> list[str]:
    has_image = raw.get("image") not in (None, [])
    has_images = raw.get("images") not in (None, [])
    if has_image and has_images:
        problems.append("has both 'image' and 'images'")
    value = raw.get("image") if has_image else raw.get("images") if has_images else []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        problems.append(f"'image(s)' is {type(value).__name__}, not a path or a list of paths")
        return []
    out = []
    for im in items:
        if not isinstance(im, str) or not im:
            problems.append(f"image entry {im!r} is not a path")
        else:
            out.append(im)
    return out


def count_placeholders(conversations: Any) -> int:
    """Number of ``<image>`` placeholders over all turns (non-string values count 0)."""
    if not isinstance(conversations, list):
        return 0
    return sum(v.count(IMAGE_TOKEN) for t in conversations
               if isinstance(t, Mapping) and isinstance(v := t.get("value"), str))


def make_record(raw: Any, *, source: str = "", index: int = 0, image_first: bool = False) -> Record:
    """A :class:`Record` from one raw JSON object, applying the placeholder convention.

    ``image_first`` reproduces LLaVA's ``preprocess_multimodal``: a turn holding exactly one
    ``<image>`` gets it moved to its start followed by "\\n" (what LLaVA-1.5/NeXT trained on).
    """
    problems: list[str] = []
    auto = f"{Path(source).name}#{index}"
    if isinstance(raw, BadLine):  # a JSONL line that could not be read
        return Record(auto, [], [], source, index, [raw.message], auto_id=True, unreadable=True)
    if not isinstance(raw, Mapping):
        return Record(auto, [], [], source, index, [f"is a JSON {type(raw).__name__}, not an object"], auto_id=True)
    rid = raw.get("id")
    auto_id = rid is None or rid == ""
    rid = auto if auto_id else str(rid)
    images = _image_list(raw, problems)
    conv = raw.get("conversations")
    if isinstance(conv, list):
        conv = [dict(t) if isinstance(t, Mapping) else t for t in conv]
        if images and count_placeholders(conv) == 0:
            first = next((t for t in conv if isinstance(t, dict) and t.get("from") == "human"
                          and isinstance(t.get("value"), str)), None)
            if first is not None:  # LLaVA's convention: the image goes before the first question
                first["value"] = (IMAGE_TOKEN + "\n") * len(images) + first["value"]
        if image_first:
            for t in conv:
                v = t.get("value") if isinstance(t, dict) else None
                if isinstance(v, str) and v.count(IMAGE_TOKEN) == 1 and not v.startswith(IMAGE_TOKEN):
                    t["value"] = (IMAGE_TOKEN + "\n" + v.replace(IMAGE_TOKEN, "").strip()).strip()
    return Record(rid, images, conv, source, index, problems, auto_id=auto_id)  # type: ignore[arg-type]


def check_record(record: Record) -> list[str]:
    """The structural problems of a record (empty when fine): fields, roles, placeholders."""
    problems = list(record.problems)
    conv = record.conversations
    if not isinstance(conv, list) or not conv:
        if not record.unreadable:  # an unreadable JSONL line has none by construction: its problem says why
            problems.append("has no conversations")
        return problems
    for i, t in enumerate(conv):
        if not isinstance(t, Mapping):
            problems.append(f"turn {i} is not an object with 'from' and 'value'")
            continue
        role, value = t.get("from"), t.get("value")
        if role not in ROLES:
            problems.append(f"turn {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(value, str):
            problems.append(f"turn {i}: 'value' is {type(value).__name__}, not a string")
        elif role == "gpt" and IMAGE_TOKEN in value:
            problems.append(f"turn {i}: a gpt reply contains {IMAGE_TOKEN}")
    n = count_placeholders(conv)
    if n != len(record.images):
        problems.append(f"has {n} {IMAGE_TOKEN} placeholder(s) but {len(record.images)} image(s)")
    return problems


def parse_sampling(strategy: str) -> tuple[str, int | None, float | None]:
    """``"first:10%"`` → ``("first", None, 10.0)``; ``"end:5000"`` → ``("end", 5000, None)``;
    ``"all"`` → ``("all", None, None)``. Raises ValueError on anything else."""
    s = str(strategy).strip()
    kind, _, num = s.partition(":")
    kind = kind.strip()
    if kind not in STRATEGIES:
        raise ValueError(f"unknown sampling strategy {s!r}; use all, first:N, end:N or random:N (N a count or a percentage)")
    if kind == "all":
        if num:
            raise ValueError(f"sampling strategy {s!r}: 'all' takes no number")
        return kind, None, None
    num = num.strip()
    try:
        if num.endswith("%"):
            pct = float(num[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return kind, None, pct
        n = int(num)
        if n < 0:
            raise ValueError
        return kind, n, None
    except ValueError:
        raise ValueError(f"sampling strategy {s!r}: expected {kind}:N with N a count >= 0 or a percentage 0-100%") from None


def sample_indices(n: int, strategy: str, *, seed: int = 0, key: str = "") -> list[int]:
    """Indices (ascending) of the records ``strategy`` keeps out of ``n``.

    A percentage keeps ``ceil(pct * n / 100)`` as LLaVA-NeXT does. ``random`` is seeded by
    ``seed`` and ``key`` (the file), so a mixture samples the same records on every run and rank.
    """
    kind, count, pct = parse_sampling(strategy)
    if kind == "all":
        return list(range(n))
    k = min(n, math.ceil(pct * n / 100) if pct is not None else int(count))  # type: ignore[arg-type]
    if kind == "first":
        return list(range(k))
    if kind == "end":
        return list(range(n - k, n))
    return sorted(random.Random(f"{seed}:{key}").sample(range(n), k))


def _load_file(path: Path, *, image_first: bool, keep: str = "all", seed: int = 0, key: str = "") -> list[Record]:
    raw = _read_json_list(path)
    src = str(path)
    return [make_record(raw[i], source=src, index=i, image_first=image_first)
            for i in sample_indices(len(raw), keep, seed=seed, key=key)]


def _load_yaml(path: Path, *, image_first: bool, seed: int) -> list[Record]:
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        raise DataError("reading a YAML data mixture needs pyyaml (pip install pyyaml)") from None
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataFileNotFoundError(f"data mixture {str(path)!r}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"data mixture {str(path)!r}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise DataError(f"data mixture {str(path)!r}: malformed YAML ({e})") from None
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not isinstance(entries, list):
        raise DataError(f"data mixture {str(path)!r}: expected 'datasets:' with a list of {{json_path, sampling_strategy}}")
    out: list[Record] = []
    for k, entry in enumerate(entries):
        where = f"data mixture {str(path)!r}, entry {k}"
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str):
            raise DataError(f"{where}: needs a 'json_path'")
        jp = Path(entry["json_path"]).expanduser()
        if not jp.is_absolute():
            jp = path.parent / jp  # relative to the YAML file, not to the working directory
        strategy = str(entry.get("sampling_strategy", "all"))
        try:
            parse_sampling(strategy)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        if not jp.exists():
            raise DataFileNotFoundError(f"{where}: data file {str(jp)!r} does not exist")
        out += _load_file(jp, image_first=image_first, keep=strategy, seed=seed, key=f"{k}:{jp.name}")
    return out


def load_records(paths: str | os.PathLike | Sequence[str | os.PathLike], *, strict: bool = True, seed: int = 0,
                 image_first: bool = False) -> list[Record]:
    """Records of one or more data files: ``.json`` (a list), ``.jsonl``, or a LLaVA-NeXT
    ``.yaml``/``.yml`` mixture (``datasets: [{json_path, sampling_strategy}]``, paths relative to
    the YAML file, ``random`` sampling seeded by ``seed``).

    Missing or malformed files always raise (:class:`DataFileNotFoundError`, :class:`DataError`
    with the line for JSONL). With ``strict`` bad records raise one :class:`RecordError` listing
    them; without it they are returned for :func:`validate` to report with the rest.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    records: list[Record] = []
    for p in items:
        path = Path(p).expanduser()
        if path.suffix.lower() in (".yaml", ".yml"):
            records += _load_yaml(path, image_first=image_first, seed=seed)
        else:
            records += _load_file(path, image_first=image_first)
    if strict:
        problems = [Problem(r.id, r.source, m) for r in records for m in check_record(r)]
        if problems:
            raise RecordError(_format_problems(problems, len(records)), problems)
    return records


# --- validation ----------------------------------------------------------------------------------

def resolve_image(image_folder: str | os.PathLike | None, path: str) -> str:
    """Absolute path of an image entry (absolute entries are kept)."""
    return os.path.abspath(os.path.join(os.fspath(image_folder), path) if image_folder is not None else path)


def outside_folder(image_folder: str | os.PathLike | None, path: str) -> str | None:
    """The problem of an image entry that leaves ``image_folder`` (None when it stays inside, or
    without a folder): ``../x.png``, an absolute path elsewhere, or a symlink pointing out.

    Both sides are resolved (symlinks followed) before the check, so a link inside the folder to a
    file elsewhere is refused, and a folder that is itself a link works. A missing file resolves
    as far as it exists; it is reported as missing later if it stays inside.
    """
    if image_folder is None:
        return None
    root = os.path.realpath(os.fspath(image_folder))
    target = os.path.realpath(resolve_image(image_folder, path))
    if target == root or os.path.commonpath([root, target]) != root:
        return f"image {path!r} is outside the image folder {os.fspath(image_folder)!r} (resolves to {target!r}); refused"
    return None


def contained_image(image_folder: str | os.PathLike | None, path: str, where: str = "") -> str:
    """:func:`resolve_image`, raising :class:`DataError` (prefixed by ``where``) for an entry
    outside ``image_folder`` (:func:`outside_folder`)."""
    problem = outside_folder(image_folder, path)
    if problem:
        raise DataError(f"{where}: {problem}" if where else problem)
    return resolve_image(image_folder, path)


_TAIL = 4096


def _truncation(path: str) -> str | None:
    """Cheap end-of-file check for the common formats (the header alone cannot see truncation):
    a PNG ends with its IEND chunk, a JPEG with its EOI marker, a WebP is as long as its RIFF
    header says. Reads at most the first 12 and the last 4096 bytes."""
    with open(path, "rb") as f:
        head = f.read(12)
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - _TAIL))
        tail = f.read()
    if head.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" not in tail:
        return "PNG has no IEND chunk at its end"
    if head.startswith(b"\xff\xd8") and b"\xff\xd9" not in tail:
        return "JPEG has no end-of-image marker"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and size < int.from_bytes(head[4:8], "little") + 8:
        return "WebP is shorter than its RIFF header says"
    return None


def check_image(path: str, mode: bool | str = True) -> tuple[tuple[int, int] | None, str | None]:
    """``((w, h), None)`` for a usable image, ``(None, problem)`` otherwise.

    ``mode``: True reads the header and checks the file's end (fast); "decode" decodes fully.
    """
    if not os.path.exists(path):
        return None, f"image file {path!r} not found"
    try:
        if mode == "decode":
            img = load_image(path)
            return img.size, None
        size = image_size(path)
        trunc = _truncation(path)
        if trunc:
            return None, f"image file {path!r} is truncated ({trunc})"
        return size, None
    except ImageLoadError as e:
        return None, str(e)
    except OSError as e:
        return None, f"image file {path!r}: {e}"


class VisualTokenCounter:
    """Plans and counts images as the model splices them, per image size, cached (plans are pure
    geometry): the one count of a method's visual tokens for validation, dataset lengths and the
    trainer's length grouping.

    A preset plans with :func:`~hires_lmm.plan.plan_image` (``method`` and ``plan_options``).
    ``method_spec`` (a composed method: the model config's ``method_spec``, its method-file form,
    or a :class:`~hires_lmm.parts.MethodSpec`) plans through its parts as
    :func:`hires_lmm.processing.plan_for` does (e.g. LLaVA-NeXT's tiles through UHD's resampler are
    ~4x fewer tokens than the planner's count of ``method``, and a budget in ``plan_options``
    applies to the composed count); ``plan_options`` then replace its views options, as the model's
    config does (None keeps the spec's own). ``method`` may be None with a ``method_spec``.

    Picklable (DataLoader workers render with :meth:`prepare`): a composed spec given as a mapping
    is rebuilt in the worker, and the per-size cache starts empty there.
    """

    def __init__(self, method: str | None, plan_options: Mapping[str, Any] | None = None, *,
                 method_spec: Any = None) -> None:
        self.method, self.options = method, dict(plan_options or {})
        self._keep_options = plan_options is not None
        self._raw = method_spec if method_spec else None  # {} is a preset, as the model config has it
        self._spec: Any = None
        if self._raw is None and method is None:
            raise ValueError("VisualTokenCounter needs a method or a method_spec")
        self._cache: dict[tuple[int, int], int] = {}

    @classmethod
    def of(cls, model: Any) -> VisualTokenCounter:
        """The counter of ``model`` (a :class:`~hires_lmm.model.HiresLMM`) as it is configured now:
        its method, its ``plan_options`` (a training stage's, a budget among them) and its
        ``method_spec`` if it is composed."""
        c = model.config
        return cls(c.method, c.plan_options, method_spec=getattr(c, "method_spec", None))

    def __getstate__(self) -> dict[str, Any]:
        built = self._spec if not isinstance(self._raw, Mapping) else None
        return {**self.__dict__, "_spec": built, "_cache": {}}

    @property
    def spec(self) -> Any:
        """The composed method's :class:`~hires_lmm.parts.MethodSpec` (None for a preset)."""
        if self._spec is None and self._raw is not None:
            from ..processing import method_spec_of  # torch / transformers: only for a composed method

            self._spec = method_spec_of(self._raw, self.options if self._keep_options else None)
        return self._spec

    @property
    def name(self) -> str:
        """The method as its plans name it (a composed method's spec name, e.g. ``llava-next+uhd-spatial``)."""
        return str(self.spec.name) if self.spec is not None else str(self.method)

    def plan(self, size: tuple[int, int]) -> Any:
        """The :class:`~hires_lmm.plan.Plan` of an image of ``size`` = (width, height) with the count
        the model splices; a budget no plan fits raises :class:`~hires_lmm.plan.budget.BudgetError`."""
        spec = self.spec
        return spec.plan(size) if spec is not None else plan_image(str(self.method), size, **self.options)

    def __call__(self, size: tuple[int, int]) -> int:
        """Visual tokens of an image of ``size`` (cached)."""
        n = self._cache.get(size)
        if n is None:
            n = self._cache[size] = int(self.plan(size).num_visual_tokens)
        return n

    num_visual_tokens = __call__

    def prepare(self, path: str | os.PathLike) -> Any:
        """Load (safely), plan and render one image: the :class:`~hires_lmm.processing.ImageInput`
        the model is fed, exactly :func:`~hires_lmm.processing.prepare_image`'s."""
        from ..processing import prepare_image  # torch: only where images are rendered

        spec = self.spec
        # prepare_image replaces a spec's views options by its plan_options: give it the spec's own
        # when this counter keeps them (plan_options=None)
        options = self.options if spec is None or self._keep_options else dict(spec.options.get("views") or {})
        return prepare_image(path, str(self.method), options, method_spec=spec)


@dataclass
class ValidationReport:
    """What :func:`validate` found.

    Attributes:
        problems: ``(record_id, source, message)`` for every problem, in record order.
        ok_records: the records without problems.
        lengths: per ok record, its sequence length (text tokens + visual tokens; text only when
            images were not checked).
        num_records: how many records were checked.
        budget_problems: the problems that are budget refusals (an image no plan of the method
            fits ``max_visual_tokens`` for), also in ``problems``.
    """

    problems: list[Problem]
    ok_records: list[Record]
    lengths: list[int]
    num_records: int
    budget_problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def num_bad(self) -> int:
        """How many records have at least one problem."""
        return len({(p.record_id, p.source) for p in self.problems})

    def summary(self, limit: int = 20) -> str:
        if self.ok:
            return f"all {self.num_records} records are fine"
        return _format_problems(self.problems, self.num_records, limit)

    def raise_if_bad(self, limit: int = 20) -> None:
        """Raise one :class:`RecordError` listing the first ``limit`` problems and the totals."""
        if self.problems:
            raise RecordError(self.summary(limit), self.problems)


def validate(records: Sequence[Record], *, image_folder: str | os.PathLike | None, tokenizer: PreTrainedTokenizerBase,
             template: str | ChatTemplate, max_length: int | None, method: str | None = None,
             plan_options: Mapping[str, Any] | None = None, check_images: bool | str = True,
             add_bos: bool | None = None, num_workers: int = 8, progress: bool | None = None,
             chunk_size: int = 1024, method_spec: Any = None,
             counter: VisualTokenCounter | None = None) -> ValidationReport:
    """Find every bad record before training.

    Per record: structural problems (:func:`check_record`); each image missing, not an image,
    corrupt or truncated (``check_images``: True = header + end-of-file check, "decode" = full
    decode, False = images not opened); the template failing on the conversation; segment-wise
    ids differing from the whole text tokenised (:func:`check_alignment`); no trained-on token;
    and the sequence longer than ``max_length``, counting each image as
    ``plan_image(method, size, **plan_options).num_visual_tokens`` tokens in place of its
    placeholder, or, with ``method_spec`` (a composed method: the model config's ``method_spec``),
    the count its parts splice (:class:`VisualTokenCounter`; pass it whenever the model has one:
    the planner's count of ``method`` alone is wrong for it), or ``counter`` (the model's own:
    :meth:`VisualTokenCounter.of`). An image no plan fits the budget (``max_visual_tokens`` in
    ``plan_options``) for is a problem of its record, listed in ``budget_problems`` too. Each distinct image file is read
    once (threads: file access dominates); records are tokenised ``chunk_size`` at a time in one
    batched tokenizer call.
    """
    from tqdm.auto import tqdm

    tpl = get_template(template)
    counts = method is not None or method_spec is not None or counter is not None
    if max_length is not None and check_images and not counts and any(r.images for r in records):
        raise ValueError("validate needs the method to count visual tokens against max_length")
    show = len(records) >= 10_000 if progress is None else progress
    sizes: dict[str, tuple[tuple[int, int] | None, str | None]] = {}
    # entries that leave the image folder are problems of their records and never opened
    escapes = {p: err for p in dict.fromkeys(p for r in records for p in r.images)
               if (err := outside_folder(image_folder, p))}
    first_of: dict[str, tuple[str, int]] = {}  # explicit id -> (source, index) of its first record
    if check_images:
        paths = list(dict.fromkeys(resolve_image(image_folder, p) for r in records for p in r.images
                                   if p not in escapes))
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            results = pool.map(lambda p: check_image(p, check_images), paths)
            for p, res in zip(paths, tqdm(results, total=len(paths), desc="images", disable=not show)):
                sizes[p] = res
    count = counter or (VisualTokenCounter(method, plan_options, method_spec=method_spec) if counts else None)
    problems: list[Problem] = []
    budget_problems: list[Problem] = []
    ok: list[Record] = []
    lengths: list[int] = []
    bar = tqdm(total=len(records), desc="records", disable=not show)
    for c0 in range(0, len(records), chunk_size):  # tokenised a chunk at a time: one batched call each
        chunk = records[c0:c0 + chunk_size]
        structural = [check_record(r) for r in chunk]
        todo = [k for k, st in enumerate(structural) if not st]  # tokenised even when an image is bad
        encs = dict(zip(todo, tpl.encode_many(tokenizer, [chunk[k].conversations for k in todo], add_bos=add_bos)))
        for k, r in enumerate(chunk):
            mine = [Problem(r.id, r.source, m) for m in structural[k]]
            if not r.auto_id:
                # the same (source, index) again is the same record listed twice (a mixture naming
                # a file twice to upweight it), not a clash
                first = first_of.setdefault(r.id, (r.source, r.index))
                if first != (r.source, r.index):
                    mine.append(Problem(r.id, r.source, f"duplicate id: record #{r.index} has the id of "
                                                        f"record #{first[1]} of {first[0]}"))
            mine += [Problem(r.id, r.source, escapes[p]) for p in r.images if p in escapes]
            known: list[tuple[int, int]] = []
            for p in r.images if check_images else []:
                if p in escapes:
                    continue
                size, err = sizes[resolve_image(image_folder, p)]
                if err:
                    mine.append(Problem(r.id, r.source, err))
                else:
                    known.append(size)  # type: ignore[arg-type]
            n_text = None
            enc = encs.get(k)
            if isinstance(enc, Exception):
                mine.append(Problem(r.id, r.source, f"{tpl.name} template: {enc}"))
            elif enc is not None:
                n_text = len(enc.input_ids)
                if enc.labels.count(IGNORE_INDEX) == len(enc.labels):
                    mine.append(Problem(r.id, r.source, "has no reply to train on (every label is -100)"))
            total = n_text
            if n_text is not None and count is not None and check_images and known and len(known) == len(r.images):
                try:
                    visual = sum(count(sz) for sz in known)
                except BudgetError as e:  # no plan fits the budget: a bad record, not a crash
                    budget_problems.append(Problem(r.id, r.source, one_line(e)))
                    mine.append(budget_problems[-1])
                else:
                    total = n_text - len(known) + visual
                    if max_length is not None and total > max_length:
                        mine.append(Problem(r.id, r.source, (
                            f"sequence of {total} tokens ({n_text - len(known)} text + {visual} visual for "
                            f"{len(known)} image(s) with {count.name}) exceeds max_length {max_length}")))
            elif n_text is not None and max_length is not None and n_text > max_length:
                mine.append(Problem(r.id, r.source, f"sequence of {n_text} text tokens exceeds max_length {max_length}"))
            if mine:
                problems += mine
            else:
                ok.append(r)
                lengths.append(int(total))  # type: ignore[arg-type]
        bar.update(len(chunk))
    bar.close()
    return ValidationReport(problems, ok, lengths, len(records), budget_problems)


def iter_images(records: Iterable[Record], image_folder: str | os.PathLike | None) -> list[str]:
    """Distinct absolute image paths of ``records``, in first-use order."""
    return list(dict.fromkeys(resolve_image(image_folder, p) for r in records for p in r.images))


__all__ = ["BadLine", "DataError", "DataFileNotFoundError", "Problem", "Record", "RecordError", "STRATEGIES",
           "ValidationReport", "VisualTokenCounter", "check_image", "check_record", "contained_image",
           "count_placeholders", "iter_images", "load_records", "make_record", "outside_folder", "parse_sampling",
           "resolve_image", "sample_indices", "validate"]
