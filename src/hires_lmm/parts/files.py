"""Method files and method names → :class:`~.spec.MethodSpec`.

A method file (JSON or YAML) names a preset and the stages it changes::

    {"base": "llava-next", "compressor": "uhd-spatial", "compressor_options": {"grid": 12}}

Keys: ``base`` (a preset; without one every stage must be named), ``name`` (default: the file's
stem), one ``STAGE: PART`` per changed stage, ``STAGE_options`` (options of that stage's part: a
kept part keeps the base's options, updated by these; a changed part starts from its defaults) and
``recipes`` (the preset whose training stages apply; default: the base's).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .options import PartError
from .registry import METHOD_SPECS, STAGES
from .spec import MethodSpec

__all__ = ["is_method_file", "load_method_file", "resolve_method", "spec_from_dict"]

_SUFFIXES = (".json", ".yaml", ".yml")
_KEYS = ("name", "base", "recipes", *STAGES, *(f"{s}_options" for s in STAGES))


def is_method_file(method: object) -> bool:
    """Whether ``method`` names a method file rather than a registered method."""
    if isinstance(method, os.PathLike):
        return True
    if not isinstance(method, str) or method in METHOD_SPECS:
        return False
    return method.lower().endswith(_SUFFIXES) or os.sep in method or Path(method).is_file()


def resolve_method(method: str | os.PathLike[str] | Mapping[str, Any] | MethodSpec) -> MethodSpec:
    """A registered method's spec, a method file's, a method-file dict's, or ``method`` itself."""
    _ensure_registered()
    if isinstance(method, MethodSpec):
        return method
    if isinstance(method, Mapping):
        return spec_from_dict(method)
    if isinstance(method, str) and method in METHOD_SPECS:
        return METHOD_SPECS[method]
    if is_method_file(method):
        return load_method_file(method)
    raise PartError(f"unknown method {method!r}; choose from {', '.join(METHOD_SPECS)} "
                    "or give a method file (.json, .yaml)")


def load_method_file(path: str | os.PathLike[str]) -> MethodSpec:
    """The spec a JSON/YAML method file describes (errors name the file)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PartError(f"method file {p}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PartError(f"method file {p}: cannot read it ({type(e).__name__})") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ValueError as e:  # json.JSONDecodeError
        raise PartError(f"method file {p}: not valid JSON ({e})") from None
    except Exception as e:  # yaml.YAMLError and its many subclasses
        raise PartError(f"method file {p}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, Mapping):
        raise PartError(f"method file {p}: expected a mapping of stages to parts, got {type(data).__name__}")
    try:
        return spec_from_dict(data, default_name=p.stem)
    except PartError as e:
        raise PartError(f"method file {p}: {e}") from None


def spec_from_dict(data: Mapping[str, Any], *, default_name: str | None = None) -> MethodSpec:
    """The spec of a method-file mapping (see the module docstring)."""
    _ensure_registered()
    unknown = [k for k in data if k not in _KEYS]
    if unknown:
        raise PartError(f"unknown key {unknown[0]!r}; a method file has base, name, recipes, a part per stage "
                        f"({', '.join(STAGES)}) and <stage>_options")
    base_name = data.get("base")
    base = None
    if base_name is not None:
        if base_name not in METHOD_SPECS:
            raise PartError(f"unknown base {base_name!r}; choose from {', '.join(METHOD_SPECS)}")
        base = METHOD_SPECS[base_name]
    elif missing := [s for s in STAGES if s not in data]:
        raise PartError(f"no base preset, so every stage needs a part; missing: {', '.join(missing)}")
    parts: dict[str, str] = {}
    options: dict[str, dict[str, Any]] = {}
    for s in STAGES:
        part = data.get(s, base.parts[s] if base else None)
        if not isinstance(part, str):
            raise PartError(f"stage {s}: the part must be a name, got {part!r}")
        parts[s] = part
        given = data.get(f"{s}_options") or {}
        if not isinstance(given, Mapping):
            raise PartError(f"{s}_options must be a mapping, got {type(given).__name__}")
        inherited = dict(base.options.get(s, {})) if base and part == base.parts[s] else {}
        if inherited or given:
            options[s] = {**inherited, **given}
    changed = [parts[s] for s in STAGES if base is None or parts[s] != base.parts[s]]
    name = data.get("name") or default_name or "+".join([base_name or "custom", *changed])
    recipes = data.get("recipes", base.recipes if base else None)
    if recipes is not None and recipes not in METHOD_SPECS:
        raise PartError(f"recipes {recipes!r}: not a method; choose from {', '.join(METHOD_SPECS)}")
    spec = MethodSpec(str(name), parts, options, recipes=recipes, base=base_name)
    spec.check()
    return spec


def _ensure_registered() -> None:
    from . import methods  # noqa: F401  (registers the presets' parts and specs)
