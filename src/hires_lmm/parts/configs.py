"""A method spec ↔ the fields of a saved config (:class:`~hires_lmm.config.HiresConfig`).

* ``method``: the views part (a planner name, so the config validates and plans as before);
* ``plan_options``: the views options;
* ``connector``: every other part's options, flat (the form config.json files have always had, so
  old directories load; ``separator_ids`` of converted checkpoints rides along);
* ``method_spec``: only for a composed method (parts other than a preset's), its method-file form
  with every option written out, which rebuilds it exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .files import resolve_method, spec_from_dict
from .options import PartError
from .spec import MODEL_KEYS, MethodSpec

__all__ = ["config_fields", "spec_from_config"]


def config_fields(spec: MethodSpec, *, tiny: bool = False, model_keys: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of :class:`~hires_lmm.config.HiresConfig` for ``spec``."""
    resolved = spec.resolved(tiny=tiny)
    connector = resolved.connector()
    connector.update({k: v for k, v in (model_keys or {}).items() if k in MODEL_KEYS})
    fields: dict[str, Any] = {"method": spec.parts["views"], "plan_options": dict(spec.options.get("views", {})),
                              "connector": connector}
    if not spec.is_preset_parts():
        fields["method_spec"] = resolved.to_json()
    return fields


def spec_from_config(config: Any) -> MethodSpec:
    """The spec a config describes (``method_spec`` when there is one, else the preset
    ``config.method`` with ``connector`` routed to its parts); ``plan_options`` are the views
    options either way (training stages update them)."""
    raw = getattr(config, "method_spec", None)
    if raw:
        if not isinstance(raw, Mapping):
            raise PartError(f"config method_spec must be a mapping, got {type(raw).__name__}")
        spec = spec_from_dict(raw)
    else:
        spec = resolve_method(config.method).with_options(dict(config.connector or {}))
    options = {**spec.options, "views": dict(config.plan_options or {})}
    spec = dataclasses.replace(spec, options=options)
    spec.check()
    return spec
