"""What ``--resume`` checks and repairs besides the checkpoint itself: that the run's arguments
and data are those of the run being resumed, and that ``metrics.jsonl`` does not repeat steps."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigMismatchError, TrainingError, one_line

#: arguments that change neither the model nor the data nor the optimisation: never compared
UNCHECKED = frozenset({"output_dir", "resume", "overwrite", "progress", "log_steps", "num_workers", "save_steps",
                       "keep_last", "allow_changed"})
#: arguments a resumed run may change when asked to (``--allow-changed``): training longer or
#: shorter (the schedule follows the new length), memory and precision settings
OVERRIDABLE = frozenset({"max_steps", "epochs", "gradient_checkpointing", "mixed_precision"})
#: arguments naming files: the same file spelled relative or absolute is the same argument
PATH_FIELDS = frozenset({"data_path", "image_folder", "vision", "llm", "convnext", "init"})


def _same(field: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if field in PATH_FIELDS and isinstance(old, str) and isinstance(new, str):
        return os.path.abspath(os.path.expanduser(old)) == os.path.abspath(os.path.expanduser(new))
    return False


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       defaults: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, current value)`` for every compared argument that differs. A field
    the saved config lacks (written before the field existed) counts as its default."""
    diffs = []
    for name, value in current.items():
        if name in UNCHECKED:
            continue
        old = saved.get(name, defaults.get(name))
        if not _same(name, old, value):
            diffs.append((name, old, value))
    return diffs


def check_same_run(saved: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any], *,
                   allowed: Iterable[str], where: str) -> list[str]:
    """Refuse (:class:`ConfigMismatchError`) a resumed run whose arguments differ from the saved
    ones in any field not in ``allowed``. Returns the allowed fields that did change."""
    diffs = config_differences(saved, current, defaults)
    allowed = set(allowed)
    blocked = [d for d in diffs if d[0] not in allowed]
    if blocked:
        listed = ", ".join(f"{f} {one_line(repr(a), 60)} → {one_line(repr(b), 60)}" for f, a, b in blocked)
        hint = sorted({f for f, _, _ in blocked} & OVERRIDABLE)
        extra = f"; to change {', '.join(hint)} on purpose pass --allow-changed {','.join(hint)}" if hint else ""
        raise ConfigMismatchError(f"--resume: the arguments differ from the run being resumed ({where}): {listed}; "
                                  f"resume with the same arguments or start a new --output-dir{extra}")
    return [f for f, _, _ in diffs]


def data_fingerprint(records: Sequence[Any], lengths: Sequence[int]) -> dict[str, Any]:
    """The records trained on, summarised: their number and a hash of their ids, images,
    conversations and token lengths. A resumed run must see the same data, not just the same
    file name."""
    h = hashlib.sha256()
    for rec, n in zip(records, lengths):
        h.update(json.dumps([rec.id, rec.images, rec.conversations, int(n)], sort_keys=True).encode())
        h.update(b"\n")
    return {"records": len(records), "sha256": h.hexdigest()}


def check_same_data(saved: Any, current: Mapping[str, Any], where: str) -> None:
    """Refuse a resumed run whose records differ from the checkpoint's."""
    if saved == current:
        return
    then = saved.get("records") if isinstance(saved, dict) else None
    raise ConfigMismatchError(f"--resume: the training data differ from the run being resumed ({where}: "
                              f"{then} records then, {current['records']} now, or their contents changed); "
                              "resume with the same data or start a new --output-dir")


def _step_of(line: str) -> int | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    step = rec.get("step") if isinstance(rec, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the lines of ``path`` (``metrics.jsonl``) logged after ``step``, the step a run resumes
    from, so the resumed run's lines follow on without repeats; a torn last line (the process was
    killed while writing it) goes too. Other lines are kept as they are. The file is replaced
    atomically. Returns how many lines were dropped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as e:
        raise TrainingError(f"{path}: cannot read it to continue it ({one_line(e, 120)})") from None
    keep = []
    for line in lines:
        s = _step_of(line)
        if s is not None and s > step:
            continue
        if not line.endswith("\n"):  # the last line, cut short by a kill
            if s is None:
                continue
            line += "\n"  # complete but for its newline: the next line must not join it
        keep.append(line)
    if keep == lines:
        return 0
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise TrainingError(f"{path}: cannot rewrite it ({one_line(e, 120)})") from None
    return len(lines) - len(keep)
