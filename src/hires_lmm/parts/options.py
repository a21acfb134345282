"""Typed options of a part: a frozen dataclass per part, each default written once (there).

``Options.from_dict`` is the only way in from user text (a config.json ``connector`` dict, a method
file, ``build_model(..., **overrides)``): unknown keys and values of the wrong type raise a
one-line :class:`PartError` naming the part and its options, so a typo such as ``selectr_p`` is
refused instead of saved.

Two class-level facts ride along, both part of the serialized ``connector`` form:

* ``TAGS``: constant keys a part writes next to its options (LLaVA-UHD's ``"resampler":
  "spatial"`` / ``"perceiver"``, which old config.json files use to pick the resampler); reading
  accepts them only with the part's own value.
* ``TINY``: what the tiny presets change (fewer heads, a narrower bottleneck), so a tiny model of
  any method using the part gets the same small sizes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from ..errors import HiresError

__all__ = ["NoOptions", "Options", "PartError", "field_defaults"]


class PartError(HiresError, ValueError):
    """A part, a method spec or a method file that cannot be used; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of every part's options (subclass with ``@dataclass(frozen=True)``)."""

    TAGS: ClassVar[Mapping[str, Any]] = {}
    TINY: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The option names (the serialized keys, tags excluded)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, owner: str) -> Options:
        """Validated options; ``owner`` ("compressor 'uhd-spatial'") names the part in errors."""
        if not isinstance(values, Mapping):
            raise PartError(f"{owner}: options must be a mapping, not {type(values).__name__}")
        kw: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if key in cls.TAGS:
                if value != cls.TAGS[key]:
                    raise PartError(f"{owner}: {key}={value!r} names another part (this one is {key}={cls.TAGS[key]!r})")
                continue
            if key not in cls.keys():
                known = ", ".join(cls.keys()) or "none"
                raise PartError(f"{owner}: unknown option {key!r}; its options: {known}")
            problem = _type_problem(value, hints[key])
            if problem:
                raise PartError(f"{owner}: option {key}={value!r} {problem}")
            kw[key] = value
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The serialized form (tags first, then every option), JSON-able."""
        return {**self.TAGS, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


@dataclasses.dataclass(frozen=True)
class NoOptions(Options):
    """A part without options."""


def field_defaults(cls: type[Options]) -> dict[str, Any]:
    """``{option: default}`` of an options class (for ``hires methods``)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            raise TypeError(f"{cls.__name__}.{f.name} has no default")
    return out


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the annotation ``hint`` (None when it does); only the simple
    annotations options use: bool, int, float, str, None, Literal, unions of those, dicts."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        problems = [_type_problem(value, h) for h in get_args(hint)]
        return None if any(p is None for p in problems) else "has the wrong type (" + " or ".join(
            _name(h) for h in get_args(hint)) + " expected)"
    if origin is Literal:
        return None if value in get_args(hint) else "is not one of " + ", ".join(map(repr, get_args(hint)))
    if hint is type(None):
        return None if value is None else "must be null"
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "must be a number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return None if isinstance(value, Mapping) else "must be a mapping"
    return None


def _name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, get_args(hint)))
    return getattr(hint, "__name__", str(hint))
