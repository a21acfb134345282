"""``hires compare``: several methods trained with the same budget on any LLaVA-format data,
scored on held-out questions and set against their compute (:mod:`.run`), with a table and an
accuracy-against-TFLOPs figure (:mod:`.report`, :mod:`.figure`)."""

from .run import CompareConfig, CompareError, MethodEntry, budgets_supported, resolve_methods, run_compare, words_of

__all__ = ["CompareConfig", "CompareError", "MethodEntry", "budgets_supported", "resolve_methods", "run_compare",
           "words_of"]
