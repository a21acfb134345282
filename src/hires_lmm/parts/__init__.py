"""Methods as compositions of registered parts.

>>> from hires_lmm.parts import METHOD_SPECS, PARTS, resolve_method
>>> METHOD_SPECS["slime"].parts["selector"]
'text-guided'
>>> spec = resolve_method({"base": "llava-uhd", "selector": "text-guided"})
>>> spec.plan((672, 1008)).num_visual_tokens      # an upper bound: the selector keeps top-p
1014

* :mod:`.registry`: the stages, ``@register_part``, :data:`PARTS`, :data:`METHOD_SPECS`,
  :func:`check_parts` (shape compatibility);
* :mod:`.stages`: what a part of each stage implements; :mod:`.options`: typed options;
* :mod:`.spec`: :class:`MethodSpec` (parts + options + training stages + formats; plan, cost);
* :mod:`.recipes`: :class:`Stage` (one training stage), :func:`two_stage` (LLaVA's recipe);
* :mod:`.files`: method files (JSON / YAML) and :func:`resolve_method`;
* :mod:`.configs`: spec ↔ saved config; :mod:`.methods`: the seven presets, one module per family.

See docs/adding-a-method.md.
"""

from __future__ import annotations

# the presets register themselves when a registry is first read (registry._Registry): importing
# this package imports no torch
from .configs import config_fields, spec_from_config
from .files import is_method_file, load_method_file, resolve_method, spec_from_dict
from .options import Options, PartError
from .recipes import Stage, two_stage
from .registry import BUILD_ORDER, METHOD_SPECS, PARTS, STAGES, Part, check_parts, get_part, register_method, register_part
from .spec import MethodSpec

__all__ = ["BUILD_ORDER", "METHOD_SPECS", "PARTS", "STAGES", "MethodSpec", "Options", "Part", "PartError",
           "Stage", "check_parts", "config_fields", "get_part", "is_method_file", "load_method_file", "register_method",
           "register_part", "resolve_method", "spec_from_config", "spec_from_dict", "two_stage"]
