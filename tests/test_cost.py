"""The cost model: LLaVA-UHD's Table 1 claim and sanity of the parts."""

from __future__ import annotations

import pytest

from hires_lmm.plan import METHODS, plan_image
from hires_lmm.plan.cost import ViTShape, convnext_flops, llm_hidden_for, plan_cost, vit_flops


def test_uhd_table1_claim_within_a_few_percent():
    uhd = plan_cost(plan_image("llava-uhd-arxiv", (672, 1008)), llm_params=13e9)
    base = plan_cost(plan_image("llava-1.5", (336, 336)), llm_params=13e9)
    assert uhd.total_flops / 1e12 == pytest.approx(14.6, rel=0.04)
    assert base.total_flops / 1e12 == pytest.approx(15.5, rel=0.04)
    assert uhd.total_flops < base.total_flops  # 6x the pixels for less compute
    assert uhd.total_flops / base.total_flops == pytest.approx(0.94, abs=0.04)


def test_vit_l14_336_flops():
    # 577 tokens through CLIP ViT-L/14: ~0.38 TFLOPs (2·params·tokens ≈ 0.35 plus attention)
    f = vit_flops(576, ViTShape())
    assert 0.36e12 < f < 0.40e12
    # quadratic attention: twice the tokens costs a bit more than twice
    assert vit_flops(1152) > 2 * vit_flops(576) - 0.01e12


def test_convnext_l_flops_order_of_magnitude():
    # ConvNeXt-L at 224: its paper reports "34.4G FLOPs", counted as multiply-accumulates (fvcore);
    # we count 2 FLOPs per MAC
    assert convnext_flops(224) / 1e9 == pytest.approx(2 * 34.4, rel=0.02)


def test_llm_hidden_lookup():
    assert llm_hidden_for(7e9) == 4096 and llm_hidden_for(13e9) == 5120 and llm_hidden_for(6.7e9) == 4096


@pytest.mark.parametrize("method", METHODS)
def test_every_method_has_a_cost(method):
    rep = plan_cost(plan_image(method, (1024, 768)), llm_params=7e9)
    assert len(rep.views) == len(plan_image(method, (1024, 768)).views)
    assert rep.connector_flops > 0 and rep.vision_flops > 0
    assert rep.llm_flops == pytest.approx(2 * 7e9 * rep.num_visual_tokens)
    j = rep.to_json()
    assert j["tflops"]["total"] == pytest.approx(j["tflops"]["vision"] + j["tflops"]["connector"] + j["tflops"]["llm_prefill"])


def test_hr_is_cheaper_than_llava15_at_the_same_resolution():
    # LLaVA-HR's claim: high resolution without the token explosion of running the ViT at 1022
    hr = plan_cost(plan_image("llava-hr", (1024, 1024)), llm_params=7e9)
    vit_at_1022 = vit_flops((1022 // 14) ** 2)
    assert hr.vision_flops < vit_at_1022
