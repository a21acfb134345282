"""Helpers of the planner and budget tests (``test_plan.py``, ``test_budget.py``)."""

from __future__ import annotations

from hypothesis import strategies as st


@st.composite
def image_sizes(draw):  # noqa: ANN001, ANN201  (hypothesis's draw in, a (w, h) strategy out)
    """Image sizes from 1×1 to 20000×20000 with aspect ratios up to 1:200, either orientation."""
    long = draw(st.integers(1, 20000))
    ratio = draw(st.floats(1.0, 200.0))
    short = max(1, min(long, round(long / ratio)))
    return (long, short) if draw(st.booleans()) else (short, long)
