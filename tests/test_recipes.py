"""Every preset's training stages, pinned field by field to the values they had when the recipes
lived in one table in ``train/stages.py`` (issue 16: each family's recipe now lives in its method
module, ``hires_lmm/parts/methods/``, next to its spec). Names, order, groups (prefix, lr), data,
template, plan options, visual attributes and ``save_trainable_only`` must not move."""

from __future__ import annotations

import dataclasses

import pytest

from hires_lmm.parts import METHOD_SPECS, resolve_method
from hires_lmm.train.stages import ALL, ENCODERS, GENERIC_STAGES, STAGES, Stage, get_stage

#: the fields of a Stage: a new one must be pinned here too
FIELDS = ("name", "groups", "data", "template", "plan_options", "visual", "save_trainable_only")

P, N, L = "visual.mm_projector.", "visual.image_newline", "llm."


def _llava(*prefixes: str) -> list[tuple]:
    return [("1", tuple((p, 0.001) for p in prefixes), "caption", "plain", {}, {}, True),
            ("2", tuple((p, 2e-05) for p in prefixes) + ((L, 2e-05),), "instruct", "vicuna_v1", {}, {}, False)]


#: preset → its stages in order, each (name, groups, data, template, plan_options, visual,
#: save_trainable_only), as printed by the code before the move
PINNED: dict[str, list[tuple]] = {
    "llava-1.5": [
        ("1", ((P, 0.001),), "caption", "plain", {}, {}, True),
        ("2", ((P, 2e-05), (L, 2e-05)), "instruct", "vicuna_v1", {}, {}, False),
    ],
    "llava-next": [
        ("1", ((P, 0.001), (N, 0.001)), "caption", "plain", {}, {}, True),
        ("2", ((P, 2e-05), (N, 2e-05), (L, 2e-05)), "instruct", "vicuna_v1", {}, {}, False),
    ],
    "llava-uhd": [
        ("1", ((P, 0.001),), "caption", "plain", {}, {}, True),
        ("2", ((P, 2e-05), (L, 2e-05)), "instruct", "vicuna_v1", {}, {}, False),
    ],
    "llava-uhd-arxiv": [
        ("1", ((P, 0.001),), "caption", "plain", {}, {}, True),
        ("2", ((P, 2e-05), (L, 2e-05)), "instruct", "vicuna_v1", {}, {}, False),
    ],
    "llava-hr": [
        ("1", ((P, 0.001), ("visual.vision_tower.align_stages.", 0.001)), "caption", "plain", {"S": 384}, {}, True),
        ("2", (("visual.", 2e-05), (L, 2e-05)), "instruct", "vicuna_v1", {"S": 1024}, {}, False),
    ],
    "inf-llava": [
        ("1", ((P, 0.001), ("visual.spatial_embed.", 0.001)), "caption", "plain", {}, {}, True),
        ("2", ((P, 2e-05), ("visual.spatial_embed.", 2e-05), (L, 2e-05)), "instruct", "vicuna_v1", {}, {}, False),
    ],
    "slime": [
        ("1a", (("visual.mm_projector.projection.", 0.001),), "caption", "plain", {},
         {"mode": "global", "mm_projector.fixed_expert": 0, "selector_p": 1.0}, True),
        ("1b", (("visual.mm_projector.attn.", 0.001),), "caption", "plain", {},
         {"mode": "global", "mm_projector.fixed_expert": 1, "selector_p": 1.0}, True),
        ("2", (("visual.sampler.", 0.001),), "caption", "plain", {}, {"mode": "local", "selector_p": 1.0}, True),
        ("3", ((P, 2e-05), ("visual.sampler.", 2e-05), (L, 2e-05)), "instruct", "vicuna_v1", {},
         {"mode": "both", "mm_projector.fixed_expert": None, "selector_p": 0.95}, False),
    ],
}


def _row(s: Stage) -> tuple:
    return tuple(getattr(s, f) for f in FIELDS)


def _same(a: tuple, b: tuple) -> bool:
    """Equal, and every float exactly equal with the same type (1e-3 is not 0.0010000001)."""
    return a == b and repr(a) == repr(b)


def test_stage_fields_are_pinned():
    assert tuple(f.name for f in dataclasses.fields(Stage)) == FIELDS


def test_the_two_stage_helper_matches_the_llava_rows():
    assert PINNED["llava-1.5"] == _llava(P) and PINNED["llava-next"] == _llava(P, N)
    assert PINNED["inf-llava"] == _llava(P, "visual.spatial_embed.")


@pytest.mark.parametrize("method", list(PINNED))
def test_every_preset_keeps_its_stages(method):
    # through the spec, through the STAGES mapping of train.stages and through get_stage
    spec = METHOD_SPECS[method]
    for stages in (spec.recipe(), STAGES[method]):
        assert [_row(s) for s in stages.values()] == PINNED[method]
        assert all(_same(_row(s), want) for s, want in zip(stages.values(), PINNED[method]))
        assert list(stages) == [r[0] for r in PINNED[method]]
    for want in PINNED[method]:
        assert _same(_row(get_stage(method, want[0])), want)
        # one lr for every group, the rest unchanged
        got = _row(get_stage(method, want[0], 5e-4))
        assert got == (want[0], tuple((p, 5e-4) for p, _ in want[1]), *want[2:])


def test_the_stages_mapping_lists_the_presets():
    # the presets in their order (a method registered later, as the docs' example, follows them)
    assert list(STAGES)[:len(PINNED)] == list(PINNED)
    assert list(STAGES) == [m for m, spec in METHOD_SPECS.items() if spec.recipe()] and len(STAGES) == len(list(STAGES))
    assert "nope" not in STAGES and STAGES.get("nope") is None and STAGES.get("nope", {}) == {}
    with pytest.raises(KeyError):
        STAGES["nope"]
    assert {k: list(v) for k, v in STAGES.items() if k in PINNED} == {k: [r[0] for r in v] for k, v in PINNED.items()}


def test_generic_stages_are_unchanged():
    assert GENERIC_STAGES == ("scratch", "frozen-encoders") and ALL == ""
    assert ENCODERS == ("visual.vit.", "visual.vision_tower.fast_vision_tower.",
                        "visual.vision_tower.slow_vision_tower.")
    for method in (*PINNED, {"base": "llava-uhd", "selector": "text-guided"}):
        assert _same(_row(get_stage(method, "scratch")),
                     ("scratch", (("", 0.001),), "instruct", "vicuna_v1", {}, {}, False))
        assert _same(_row(get_stage(method, "scratch", 5e-4)),
                     ("scratch", (("", 0.0005),), "instruct", "vicuna_v1", {}, {}, False))
        enc = tuple((e, None) for e in ENCODERS)
        assert _same(_row(get_stage(method, "frozen-encoders")),
                     ("frozen-encoders", (*enc, ("", 0.001)), "instruct", "vicuna_v1", {}, {}, False))
        assert _same(_row(get_stage(method, "frozen-encoders", 5e-4)),
                     ("frozen-encoders", (*enc, ("", 0.0005)), "instruct", "vicuna_v1", {}, {}, False))


def test_unknown_stage_names_the_known_ones():
    with pytest.raises(ValueError, match=r"slime has no stage '4'; its stages: 1a, 1b, 2, 3, scratch, frozen-encoders"):
        get_stage("slime", "4")


# --- composed methods: a named recipe, or the base's ----------------------------------------------

def test_a_method_file_inherits_its_base_recipe_or_names_one(tmp_path):
    inherit = resolve_method({"base": "llava-uhd", "selector": "text-guided"})
    assert inherit.recipes == "llava-uhd" and inherit.recipe() == METHOD_SPECS["llava-uhd"].recipe()
    named = resolve_method({"base": "llava-uhd", "selector": "text-guided", "recipes": "slime"})
    assert named.recipes == "slime" and list(named.recipe()) == ["1a", "1b", "2", "3"]
    f = tmp_path / "next-uhd.json"
    f.write_text('{"base": "llava-next", "compressor": "uhd-spatial"}')
    assert get_stage(str(f), "2") == get_stage("llava-next", "2")
    assert get_stage(str(f), "1").save_trainable_only
    with pytest.raises(ValueError, match="next-uhd has no stage '1a'; its stages: 1, 2, scratch, frozen-encoders"):
        get_stage(str(f), "1a")
    # no base and no recipes: only the generic stages
    full = {s: METHOD_SPECS["llava-1.5"].parts[s] for s in METHOD_SPECS["llava-1.5"].parts}
    bare = resolve_method(full)
    assert bare.recipes is None and bare.recipe() == {}
    assert get_stage(full, "scratch").name == "scratch"
    with pytest.raises(ValueError, match="its stages: scratch, frozen-encoders"):
        get_stage(full, "1")
