"""The visual-token budget (``max_visual_tokens``, issue 16 item 3).

Checked against brute force: for many sizes and budgets, each planner's choice is within the
budget and is the largest faithful configuration within it (every configuration the budget may
choose from is planned unbudgeted and compared); a refusal names the method, the budget and the
smallest count; without a budget, or with one at least the unbudgeted count, plans are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from _budget_helpers import image_sizes
from hypothesis import given, settings
from hypothesis import strategies as st

from hires_lmm.cli import main
from hires_lmm.errors import HiresError
from hires_lmm.plan import METHODS, NEXT_PINPOINTS, BudgetError, Plan, plan_image
from hires_lmm.plan.budget import BUDGET_KEYS
from hires_lmm.plan.cost import plan_cost
from hires_lmm.plan.hr import HR_SIDES

SIZES = [(1, 1), (10, 10), (200, 100), (336, 336), (400, 400), (500, 375), (375, 500), (640, 480),
         (1000, 700), (1024, 768), (672, 1088), (672, 1008), (800, 1280), (1920, 1080), (4000, 3000),
         (3000, 4000), (1000, 200), (200, 1000), (1, 10000), (10000, 1), (337, 672), (1007, 335),
         (2048, 2048), (123, 4567)]
BUDGETS = [1, 63, 64, 143, 144, 289, 433, 434, 575, 576, 600, 724, 865, 900, 1013, 1026, 1200, 1440, 1441,
           1585, 2000, 2303, 2304, 2340, 5000]


def strip_budget(plan: Plan) -> Plan:
    """``plan`` without what a budget records, to compare with the unbudgeted plan."""
    return dataclasses.replace(plan, extra={k: v for k, v in plan.extra.items() if k not in BUDGET_KEYS})


# --- the oracle: every configuration a budget may choose, planned without a budget ----------

def configurations(method: str, size) -> list[tuple[dict, Plan]]:
    """``(choice, unbudgeted plan)`` of every configuration the budget chooses among, largest first."""
    if method in ("llava-uhd", "llava-uhd-arxiv"):
        top = 6 if method == "llava-uhd-arxiv" else 7
        return [({"max_slices": k}, plan_image(method, size, max_slices=k)) for k in range(top, 0, -1)]
    if method == "slime":
        return [({"max_tiles": t}, plan_image(method, size, max_tiles=t)) for t in range(6, 1, -1)]
    if method == "llava-hr":
        return [({"S": s}, plan_image(method, size, S=s)) for s in (1024, 768, 384)]
    if method == "llava-next":  # each pinpoint alone: its count for this image
        return [({"pinpoint": p}, plan_image(method, size, pinpoints=[p])) for p in NEXT_PINPOINTS]
    return [({}, plan_image(method, size))]


def check_against_brute_force(method: str, size, budget: int) -> None:
    configs = configurations(method, size)
    fitting = [(c, p) for c, p in configs if p.num_visual_tokens <= budget]
    smallest = min(p.num_visual_tokens for _, p in configs)
    if not fitting:
        with pytest.raises(BudgetError) as e:
            plan_image(method, size, max_visual_tokens=budget)
        msg = str(e.value)
        assert "\n" not in msg
        assert msg.startswith(f"{method} ") and f"max_visual_tokens={budget}" in msg
        assert f"smallest plan has {smallest} visual tokens" in msg
        return
    got = plan_image(method, size, max_visual_tokens=budget)
    assert got.num_visual_tokens <= budget
    assert got.extra["max_visual_tokens"] == budget and got.to_json()["max_visual_tokens"] == budget
    if method == "llava-next":
        # faithful choice: the usual best-resolution rule among the pinpoints that fit, in order
        pins = [c["pinpoint"] for c, _ in fitting]
        assert strip_budget(got) == plan_image(method, size, pinpoints=pins)
        assert got.extra["budget_choice"] == {"pinpoints": [list(p) for p in pins]}
    else:
        # the largest configuration that fits, and no configuration that fits plans more tokens
        choice, expected = fitting[0]
        assert got.extra["budget_choice"] == choice
        assert got.num_visual_tokens == max(p.num_visual_tokens for _, p in fitting)
        assert strip_budget(got) == expected


@pytest.mark.parametrize("method", METHODS)
def test_budget_grid_of_sizes_and_budgets_against_brute_force(method):
    for size in SIZES:
        for budget in BUDGETS:
            check_against_brute_force(method, size, budget)


@settings(max_examples=200, deadline=None)
@given(size=image_sizes(), method=st.sampled_from(METHODS), budget=st.integers(1, 3000))
def test_budget_property_against_brute_force(size, method, budget):
    check_against_brute_force(method, size, budget)


@settings(max_examples=200, deadline=None)
@given(size=image_sizes(), method=st.sampled_from(METHODS), extra=st.integers(0, 5000))
def test_no_budget_keeps_plans_bit_for_bit(size, method, extra):
    plain = plan_image(method, size)
    assert plan_image(method, size, max_visual_tokens=None) == plain
    assert "max_visual_tokens" not in plain.extra and "max_visual_tokens" not in plain.to_json()
    for budget in (plain.num_visual_tokens, plain.num_visual_tokens + extra):
        got = plan_image(method, size, max_visual_tokens=budget)
        assert strip_budget(got) == plain
        j = got.to_json()
        assert {k: v for k, v in j.items() if k not in BUDGET_KEYS} == plain.to_json()


# --- each method's rule, on worked numbers ---------------------------------------------------

def test_uhd_lowers_the_slice_limit():
    plain = plan_image("llava-uhd", (1024, 768))  # 3x2 slices: 144·7 + 6
    assert plain.num_visual_tokens == 1014
    p = plan_image("llava-uhd", (1024, 768), max_visual_tokens=1013)
    assert p.extra["budget_choice"] == {"max_slices": 5} and p.extra["max_slices"] == 5
    assert p.grid == (2, 2) and p.num_visual_tokens == 144 * 5 + 4
    only = plan_image("llava-uhd", (1024, 768), max_visual_tokens=144)
    assert only.grid is None and [v.role for v in only.views] == ["overview"] and only.num_visual_tokens == 144
    with pytest.raises(BudgetError, match=r"llava-uhd cannot .*max_visual_tokens=143.* 144 visual tokens"):
        plan_image("llava-uhd", (1024, 768), max_visual_tokens=143)
    # the limit changes the candidate grids, not just a cap on the count: at 672x1008 a limit of
    # 4 gives 2x2 (324 tokens), a limit of 3 the grids of {2, 3} slices, of which 1x2 fits the aspect best
    arx = plan_image("llava-uhd-arxiv", (672, 1008), max_visual_tokens=64 * 4 + 3)
    assert arx.extra["max_slices"] == 3 and arx.grid == (1, 2) and arx.num_visual_tokens == 64 * 3 + 2


def test_uhd_budget_composes_with_prescale_and_an_explicit_limit():
    p = plan_image("llava-uhd", (672, 1088), prescale_long_side=1024, max_slices=4, max_visual_tokens=600)
    assert p.prescale == (632, 1024) and p.num_visual_tokens <= 600
    assert strip_budget(p) == plan_image("llava-uhd", (672, 1088), prescale_long_side=1024,
                                         max_slices=p.extra["max_slices"])
    # an explicit limit is the ceiling: a large budget does not raise it
    assert plan_image("llava-uhd", (4000, 3000), max_slices=2, max_visual_tokens=10_000).extra["max_slices"] == 2


def test_next_restricts_pinpoints_by_their_count_for_this_image():
    size = (1024, 768)
    counts = {p: plan_image("llava-next", size, pinpoints=[p]).num_visual_tokens for p in NEXT_PINPOINTS}
    assert plan_image("llava-next", size).grid == (2, 2) and counts[(672, 672)] == 2340
    p = plan_image("llava-next", size, max_visual_tokens=2339)
    assert (672, 672) not in map(tuple, p.extra["budget_choice"]["pinpoints"])
    assert p.num_visual_tokens <= 2339 and p.grid != (2, 2)
    # the unpadded count depends on the image: on 1008x336, 4:3 keeps 32 of the 72 columns, 5:1 keeps 14 rows
    assert counts[(1008, 336)] == 576 + 32 * 24 + 24
    assert plan_image("llava-next", (1000, 200), pinpoints=[(1008, 336)]).num_visual_tokens == 576 + 72 * 14 + 14
    smallest = min(counts.values())
    with pytest.raises(BudgetError, match=rf"llava-next .*max_visual_tokens={smallest - 1}: .* {smallest} visual"):
        plan_image("llava-next", size, max_visual_tokens=smallest - 1)


def test_slime_lowers_the_tile_cap_on_the_bound():
    plain = plan_image("slime", (1000, 700))  # 3x2 = 6 tiles
    assert plain.num_visual_tokens == 577 + 144 * 6
    p = plan_image("slime", (1000, 700), max_visual_tokens=577 + 144 * 6 - 1)
    assert p.num_visual_tokens <= 577 + 144 * 5 and p.extra["bound"] and p.extra["budget_choice"]["max_tiles"] < 6
    # 7 tiles are possible under the cap of 6 (s = 6 → {5, 6, 7}); a budget of 6 tiles lowers the cap
    big = plan_image("slime", (4000, 3000))
    n_tiles = len(big.views_with_role("local"))
    q = plan_image("slime", (4000, 3000), max_visual_tokens=577 + 144 * (n_tiles - 1))
    assert len(q.views_with_role("local")) < n_tiles
    with pytest.raises(BudgetError, match=r"slime cannot .*max_visual_tokens=600: .*\(max_tiles=2\)"):
        plan_image("slime", (1000, 700), max_visual_tokens=600)


def test_hr_picks_the_largest_supported_side_within_budget():
    assert HR_SIDES == (384, 768, 1024, 1536)
    want = {2304: 1536, 2303: 1024, 1024: 1024, 1023: 768, 576: 768}
    for budget, S in want.items():
        p = plan_image("llava-hr", (800, 600), S=1536, max_visual_tokens=budget)
        assert p.extra["S"] == S and p.views[0].size == (S, S) and p.num_visual_tokens <= budget
    # the budget never raises the configured side (stage 1 trains at 384)
    assert plan_image("llava-hr", (800, 600), S=384, max_visual_tokens=10_000).extra["S"] == 384
    with pytest.raises(BudgetError, match=r"llava-hr cannot .*max_visual_tokens=575: .* 576 visual tokens"):
        plan_image("llava-hr", (800, 600), max_visual_tokens=575)


@pytest.mark.parametrize("method", ["llava-1.5", "inf-llava"])
def test_fixed_counts_are_accepted_or_refused(method):
    p = plan_image(method, (1600, 1200), max_visual_tokens=576)
    assert strip_budget(p) == plan_image(method, (1600, 1200)) and p.extra["budget_choice"] == {}
    with pytest.raises(BudgetError, match=rf"^{method} cannot plan a 1600x1200 image within max_visual_tokens=575: "
                                          r"its smallest plan has 576 visual tokens"):
        plan_image(method, (1600, 1200), max_visual_tokens=575)


@pytest.mark.parametrize("bad", [0, -5, True, 1.5, "600", [600]])
def test_bad_budgets_are_refused_in_one_line(bad):
    for method in METHODS:
        with pytest.raises(BudgetError, match=r"^max_visual_tokens must be a positive integer, got ") as e:
            plan_image(method, (500, 375), max_visual_tokens=bad)
        assert isinstance(e.value, ValueError) and isinstance(e.value, HiresError)


def test_budget_travels_as_a_planner_option():
    # what the model does: plan_image(config.method, size, **config.plan_options)
    options = {"S": 1024, "max_visual_tokens": 700}
    p = plan_image("llava-hr", (640, 480), **options)
    assert p.extra["S"] == 768 and json.loads(json.dumps(p.to_json()))["budget_choice"] == {"S": 768}


def test_plan_with_a_budget_imports_no_torch():
    code = ("import sys, hires_lmm.plan as P; [P.plan_image(m, (999, 777), max_visual_tokens=3000) "
            "for m in P.METHODS]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- cost and the command line ----------------------------------------------------------------

def test_cost_under_a_budget():
    plain = plan_cost(plan_image("llava-uhd", (1024, 768)))
    rep = plan_cost(plan_image("llava-uhd", (1024, 768), max_visual_tokens=600), llm_params=7e9)
    assert rep.num_visual_tokens <= 600 and rep.total_flops < plain.total_flops
    assert rep.llm_flops == pytest.approx(2 * 7e9 * rep.num_visual_tokens)
    j = rep.to_json()
    assert j["max_visual_tokens"] == 600 and j["budget_choice"] == {"max_slices": 3}
    assert "max_visual_tokens" not in plain.to_json() and "budget_choice" not in plain.to_json()


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["plan", "cost"])
def test_cli_all_methods_under_a_budget(capsys, command):
    code, out, err = _run(capsys, command, "-m", "all", "--size", "1024x768", "--max-visual-tokens", "600", "--json")
    assert code == 2
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [r["method"] for r in rows] == ["llava-1.5", "llava-uhd", "llava-uhd-arxiv", "llava-hr", "inf-llava"]
    assert all(r["num_visual_tokens"] <= 600 and r["max_visual_tokens"] == 600 for r in rows)
    lines = err.strip().splitlines()
    assert len(lines) == 2  # one refusal per method that cannot fit
    assert lines[0].startswith(f"hires {command}: error: llava-next cannot plan a 1024x768 image within "
                               "max_visual_tokens=600: its smallest plan has 1026 visual tokens")
    assert lines[1].startswith(f"hires {command}: error: slime cannot") and "865 visual tokens" in lines[1]


def test_cli_budget_table_and_success(capsys):
    code, out, err = _run(capsys, "plan", "-m", "llava-hr", "--size", "800x600", "--max-visual-tokens", "1000")
    assert code == 0 and err == ""
    assert "visual tokens 576  budget 1000 (S=768)" in out.splitlines()[0]
    code, out, _ = _run(capsys, "cost", "-m", "llava-next", "--size", "1024x768", "--max-visual-tokens", "2000")
    assert code == 0 and "budget 2000 (pinpoints=672x336; 336x672; 336x1008; 1008x336)" in out.splitlines()[0]
    code, out, _ = _run(capsys, "plan", "-m", "llava-uhd", "--size", "1024x768")
    assert code == 0 and "budget" not in out


@pytest.mark.parametrize("bad", ["0", "-3", "many", "1.5"])
def test_cli_bad_budget(capsys, bad):
    with pytest.raises(SystemExit) as e:
        main(["plan", "-m", "slime", "--size", "10x10", "--max-visual-tokens", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--max-visual-tokens: must be a positive integer" in err and repr(bad) in err
