"""``hires convert``: released checkpoint layouts → hires-lmm model directories.

* transformers' LLaVA / LLaVA-NeXT: a tiny random ``LlavaForConditionalGeneration`` /
  ``LlavaNextForConditionalGeneration`` is saved, converted, and the project's logits are compared
  with transformers' own (same pixel values, same image-token splicing) within 1e-4.
* haotian-liu/LLaVA, LLaVA-UHD v1, LLaVA-HR, INF-LLaVA, SliME: tiny checkpoints are written with each
  repository's parameter names (our tiny model's weights under the inverted mapping), the names are
  spot-checked against the reference sources independently (``REFERENCE_NAMES``), and the converted
  model must load with no missing or unexpected weights, give the original model's logits and answer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import noise_image, run_cli
from PIL import Image

from hires_lmm.cli import main
from hires_lmm.convert import ConversionError, build_converted, convert_checkpoint, detect_format, layout_for
from hires_lmm.image.render import CLIP_MEAN, CLIP_STD, expand2square
from hires_lmm.methods import TINY_VISION, build_model
from hires_lmm.model import HiresLMM, ImageInput
from hires_lmm.plan.anyres import LLAVA_PINPOINTS
from hires_lmm.text import build_byte_tokenizer

ATOL = 1e-4
PROMPTS = ["USER: <image>\nWhat is in the picture? ASSISTANT:", "Look closely <image> and count the dots."]


def ids_of(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text).input_ids, dtype=torch.long)


def expand_image_tokens(ids: torch.Tensor, image_id: int, counts: list[int]) -> torch.Tensor:
    """transformers' processors repeat the image token once per visual token."""
    parts, start, k = [], 0, 0
    for pos in (ids == image_id).nonzero().flatten().tolist():
        parts += [ids[start:pos], torch.full((counts[k],), image_id, dtype=ids.dtype)]
        start, k = pos + 1, k + 1
    parts.append(ids[start:])
    return torch.cat(parts)


# =========================================================================== transformers formats

TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                 image_size=336, patch_size=14)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=8192, vocab_size=300, rms_norm_eps=1e-5)


def hf_processor_next(pinpoints):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_pad=True,
                                      image_grid_pinpoints=pinpoints)


def make_hf(kind: str, root: Path, *, pinpoints=None, shard: str | None = None, seed: int = 0):
    """A tiny random transformers LLaVA(-NeXT) saved with the project's byte tokenizer."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    torch.manual_seed(seed)
    tok = build_byte_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    v, t = CLIPVisionConfig(**TINY_CLIP), LlamaConfig(**TINY_LLAMA)
    if kind == "llava":
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=v, text_config=t, image_token_id=image_id))
    else:
        extra = {"image_grid_pinpoints": pinpoints} if pinpoints else {}
        model = LlavaNextForConditionalGeneration(
            LlavaNextConfig(vision_config=v, text_config=t, image_token_id=image_id, **extra))
        with torch.no_grad():
            model.model.image_newline.normal_()  # transformers initialises it to zeros
    model.eval()
    src = root / f"hf-{kind}"
    model.save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(src)
    return model, tok, src


@pytest.fixture(scope="module")
def hf_llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_llava")
    hf, tok, src = make_hf("llava", root)
    report = convert_checkpoint("hf-llava", src, root / "out")
    return hf, tok, src, root / "out", report


@pytest.fixture(scope="module")
def hf_next(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_next")
    hf, tok, src = make_hf("next", root, shard="200KB")  # sharded safetensors with an index
    report = convert_checkpoint("hf-llava-next", src, root / "out")
    return hf, tok, src, root / "out", report


def test_hf_llava_converts_every_tensor_and_carries_the_config(hf_llava):
    hf, _tok, _src, out, report = hf_llava
    assert report.method == "llava-1.5" and report.loaded == report.tensors == len(hf.state_dict())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "llava-1.5" and cfg["select_layer"] == -2
    assert cfg["connector"] == {"projector": "mlp2x_gelu"}
    assert cfg["text_config"]["model_type"] == "llama" and cfg["text_config"]["vocab_size"] == 300
    assert cfg["vision_config"]["hidden_size"] == 32 and cfg["vision_config"]["num_hidden_layers"] == 3
    assert cfg["converted_from"]["format"] == "hf-llava"
    assert any("centre-crop" in n for n in report.notes)  # the preprocessing difference is stated
    assert json.loads((out / "conversion.json").read_text())["method"] == "llava-1.5"
    model = HiresLMM.from_pretrained(out)  # refuses missing/unexpected weights by name
    assert model.tokenizer.chat_template  # carried with the tokenizer


@pytest.mark.parametrize("size", [(500, 375), (300, 900), (336, 336)])
def test_hf_llava_logits_match_transformers(hf_llava, size):
    hf, tok, _src, out, _ = hf_llava
    model = HiresLMM.from_pretrained(out)
    im = model.prepare_image(noise_image(size, 3))  # padded square: the same pixels go to both models
    image_id = tok.convert_tokens_to_ids("<image>")
    for prompt in PROMPTS:
        ids = ids_of(tok, prompt)
        with torch.no_grad():
            ours = model([ids], [[im]])
            ref = hf(input_ids=expand_image_tokens(ids, image_id, [576])[None], pixel_values=im.views[0][None])
        assert ours.logits.shape == ref.logits.shape
        assert (ours.logits - ref.logits).abs().max().item() < ATOL


def test_hf_llava_two_images_and_the_processors_own_pixels(hf_llava):
    """Two images in one prompt; then pixels from transformers' CLIP processor (shortest edge +
    centre crop, the llava-1.5-hf default) given to both models: the preprocessing is the only
    difference between the two pipelines."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    hf, tok, _src, out, _ = hf_llava
    model = HiresLMM.from_pretrained(out)
    image_id = tok.convert_tokens_to_ids("<image>")
    imgs = [noise_image((640, 480), 4), noise_image((200, 500), 5)]
    proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    crop = torch.from_numpy(np.asarray(proc.preprocess(imgs, return_tensors="np")["pixel_values"]))
    ours_px = [model.prepare_image(i) for i in imgs]
    assert (crop[0] - ours_px[0].views[0]).abs().max() > 0.1  # centre crop ≠ padded square
    padded = torch.from_numpy(np.asarray(proc.preprocess(
        [expand2square(i, tuple(int(x * 255) for x in CLIP_MEAN)) for i in imgs], return_tensors="np")["pixel_values"]))
    assert (padded[0] - ours_px[0].views[0]).abs().max() < 1e-5  # = LLaVA's pad-then-process
    ids = ids_of(tok, "First <image> then <image>; which is brighter?")
    for px in (crop, torch.stack([p.views[0] for p in ours_px])):
        ims = [ImageInput(p.plan, [px[i]]) for i, p in enumerate(ours_px)]
        with torch.no_grad():
            ours = model([ids], [ims]).logits
            ref = hf(input_ids=expand_image_tokens(ids, image_id, [576, 576])[None], pixel_values=px).logits
        assert (ours - ref).abs().max().item() < ATOL


def test_hf_llava_next_config_and_sharded_checkpoint(hf_next):
    hf, _tok, src, out, report = hf_next
    assert len(report.files) > 1 and (src / "model.safetensors.index.json").exists()
    assert report.method == "llava-next" and report.loaded == report.tensors == len(hf.state_dict())
    cfg = json.loads((out / "config.json").read_text())
    # transformers' (h, w) pinpoints become the planner's (w, h), order kept
    assert cfg["plan_options"]["pinpoints"] == [[w, h] for h, w in hf.config.image_grid_pinpoints]
    model = HiresLMM.from_pretrained(out)
    assert torch.equal(model.visual.image_newline, hf.model.image_newline)


def test_converted_pinpoints_are_accepted_by_the_planner(hf_next):
    """plan_image("llava-next", size, pinpoints=...) takes the converted (w, h) pairs (lists from
    config.json or tuples) and, for transformers' default list, plans exactly as the preset."""
    from hires_lmm.plan import NEXT_PINPOINTS, plan_image

    _hf, _tok, _src, out, _ = hf_next
    pins = json.loads((out / "config.json").read_text())["plan_options"]["pinpoints"]
    assert [tuple(p) for p in pins] == list(NEXT_PINPOINTS)
    for size in [(500, 375), (200, 150), (300, 1000), (1000, 300), (2000, 2000)]:
        a = plan_image("llava-next", size, pinpoints=pins)
        b = plan_image("llava-next", size, pinpoints=[tuple(p) for p in pins])
        c = plan_image("llava-next", size)
        assert a.grid == b.grid == c.grid and a.num_visual_tokens == c.num_visual_tokens
        assert [v.size for v in a.views] == [v.size for v in c.views]


@pytest.mark.parametrize("size", [(500, 375), (300, 900), (1000, 300), (200, 150), (1024, 1024)])
def test_hf_llava_next_logits_match_transformers(hf_next, size):
    """Same pixels (transformers' LlavaNextImageProcessorPil) to both; several sizes and aspect ratios."""
    hf, tok, _src, out, _ = hf_next
    model = HiresLMM.from_pretrained(out)
    img = noise_image(size, 7)
    px = torch.from_numpy(np.asarray(hf_processor_next(hf.config.image_grid_pinpoints)
                                     .preprocess([img], return_tensors="np")["pixel_values"]))
    ours_views = model.prepare_image(img).views
    assert px.shape[1] == len(ours_views)
    assert (px[0] - torch.stack(ours_views)).abs().max().item() < 1e-5  # the renderer agrees too
    im = ImageInput(model.plan(img.size), list(px[0]))
    image_id = tok.convert_tokens_to_ids("<image>")
    for prompt in PROMPTS:
        ids = ids_of(tok, prompt)
        with torch.no_grad():
            ours = model([ids], [[im]])
            n = ours.batch.num_visual_tokens
            ref = hf(input_ids=expand_image_tokens(ids, image_id, n)[None], pixel_values=px,
                     image_sizes=torch.tensor([[img.size[1], img.size[0]]]))
        assert n == [im.plan.num_visual_tokens]
        assert ours.logits.shape == ref.logits.shape
        assert (ours.logits - ref.logits).abs().max().item() < ATOL


def test_hf_llava_next_two_images_in_one_prompt(hf_next):
    hf, tok, _src, out, _ = hf_next
    model = HiresLMM.from_pretrained(out)
    imgs = [noise_image((640, 300), 8), noise_image((300, 640), 9)]
    px = torch.from_numpy(np.asarray(hf_processor_next(hf.config.image_grid_pinpoints)
                                     .preprocess(imgs, return_tensors="np")["pixel_values"]))  # padded to 5 views
    ims = []
    for i, img in enumerate(imgs):
        plan = model.plan(img.size)
        ims.append(ImageInput(plan, list(px[i, :len(plan.views)])))
    ids = ids_of(tok, "A <image> B <image> which is wider?")
    with torch.no_grad():
        ours = model([ids], [ims])
        ref = hf(input_ids=expand_image_tokens(ids, tok.convert_tokens_to_ids("<image>"),
                                               ours.batch.num_visual_tokens)[None],
                 pixel_values=px, image_sizes=torch.tensor([[i.size[1], i.size[0]] for i in imgs]))
    assert (ours.logits - ref.logits).abs().max().item() < ATOL


def test_hf_llava_next_custom_pinpoint_order_decides_ties(tmp_path):
    """A small image fits every pinpoint whole: the first listed wins, in transformers' (h, w) reading."""
    pins = [[672, 336], [336, 672], [672, 672], [336, 1008], [1008, 336]]  # (h, w): portrait 336x672 first
    hf, tok, src = make_hf("next", tmp_path, pinpoints=pins, seed=1)
    convert_checkpoint("hf-llava-next", src, tmp_path / "out")
    model = HiresLMM.from_pretrained(tmp_path / "out")
    img = noise_image((200, 150), 2)
    assert model.plan(img.size).extra["best_resolution"] == [336, 672]
    px = torch.from_numpy(np.asarray(hf_processor_next(pins).preprocess([img], return_tensors="np")["pixel_values"]))
    im = ImageInput(model.plan(img.size), list(px[0]))
    ids = ids_of(tok, PROMPTS[0])
    with torch.no_grad():
        ours = model([ids], [[im]])
        ref = hf(input_ids=expand_image_tokens(ids, tok.convert_tokens_to_ids("<image>"),
                                               ours.batch.num_visual_tokens)[None],
                 pixel_values=px, image_sizes=torch.tensor([[150, 200]]))
    assert (ours.logits - ref.logits).abs().max().item() < ATOL


def test_cli_convert_and_logits_match_transformers(tmp_path, capsys):
    hf, tok, src = make_hf("next", tmp_path, seed=2)
    code = run_cli("convert", "--from", "hf-llava-next", str(src), str(tmp_path / "out"), "--json")
    out, _ = capsys.readouterr()
    assert code == 0 and json.loads(out)["method"] == "llava-next"
    img_path = tmp_path / "img.png"
    noise_image((700, 400), 11).save(img_path)
    text = "USER: <image>\nDescribe it. ASSISTANT:"
    npy = tmp_path / "logits.npy"
    assert run_cli("logits", "--model", str(tmp_path / "out"), "--image", str(img_path), "--text", text,
                   "--out", str(npy)) == 0
    info = json.loads(capsys.readouterr()[0])
    ours = np.load(npy)
    assert ours.dtype == np.float32 and list(ours.shape) == info["shape"]
    # transformers on the same pixels (our renderer's views, as the CLI fed them)
    model = HiresLMM.from_pretrained(tmp_path / "out")
    im = model.prepare_image(img_path)
    ids = ids_of(tok, text)
    with torch.no_grad():
        ref = hf(input_ids=expand_image_tokens(ids, tok.convert_tokens_to_ids("<image>"),
                                               info["num_visual_tokens"])[None],
                 pixel_values=torch.stack(im.views)[None], image_sizes=torch.tensor([[400, 700]])).logits[0]
    assert np.abs(ours - ref.numpy()).max() < ATOL
    # --pixel-values: transformers' processor output replaces the rendered views
    px = np.asarray(hf_processor_next(hf.config.image_grid_pinpoints)
                    .preprocess([Image.open(img_path).convert("RGB")], return_tensors="np")["pixel_values"])[0]
    np.save(tmp_path / "px.npy", px)
    assert run_cli("logits", "--model", str(tmp_path / "out"), "--image", str(img_path), "--text", text,
                   "--out", str(tmp_path / "l2.npy"), "--pixel-values", str(tmp_path / "px.npy")) == 0
    capsys.readouterr()
    with torch.no_grad():
        ref2 = hf(input_ids=expand_image_tokens(ids, tok.convert_tokens_to_ids("<image>"),
                                                info["num_visual_tokens"])[None],
                  pixel_values=torch.from_numpy(px)[None], image_sizes=torch.tensor([[400, 700]])).logits[0]
    assert np.abs(np.load(tmp_path / "l2.npy") - ref2.numpy()).max() < ATOL


def test_cli_errors_are_clean(tmp_path, capsys, hf_llava):
    _hf, _tok, src, out, _ = hf_llava
    assert run_cli("convert", "--from", "hf-llava", str(tmp_path / "nope"), str(tmp_path / "o")) == 2
    assert "no such checkpoint directory" in capsys.readouterr()[1]
    assert run_cli("convert", "--from", "hf-llava", str(src), str(out)) == 2  # not empty
    assert "not empty" in capsys.readouterr()[1]
    assert run_cli("convert", "--from", "hf-llava-next", str(src), str(tmp_path / "o")) == 2  # wrong format
    assert "expects 'llava_next'" in capsys.readouterr()[1]
    img = tmp_path / "i.png"
    noise_image((50, 40)).save(img)
    assert run_cli("logits", "--model", str(out), "--image", str(img), "--text", "no placeholder",
                   "--out", str(tmp_path / "x.npy")) == 2
    assert "placeholder" in capsys.readouterr()[1]


def test_hires_cli_has_convert_and_logits(capsys):
    """The real ``hires`` parser loads this package's subcommands (hires_lmm.cli.EXTENSIONS)."""
    with pytest.raises(SystemExit) as e:
        main(["convert", "--help"])
    assert e.value.code == 0 and "--from FORMAT" in capsys.readouterr()[0]
    with pytest.raises(SystemExit):
        main(["logits", "--help"])
    assert "--pixel-values" in capsys.readouterr()[0]


def _copy_checkpoint(src: Path, dst: Path, edit) -> Path:
    """A copy of a single-file safetensors checkpoint with its state dict edited."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_left_over_and_misshaped_weights_are_refused_by_name(tmp_path, hf_llava):
    _hf, _tok, src, _out, _ = hf_llava
    bad = _copy_checkpoint(src, tmp_path / "missing", lambda s: s.pop("multi_modal_projector.linear_2.bias"))
    with pytest.raises(ConversionError, match=r"missing.*visual\.mm_projector\.2\.bias"):
        convert_checkpoint("hf-llava", bad, tmp_path / "o1")
    bad = _copy_checkpoint(src, tmp_path / "extra", lambda s: s.update({"multi_modal_projector.linear_3.weight":
                                                                        torch.zeros(2, 2)}))
    with pytest.raises(ConversionError, match=r"no place in the model.*multi_modal_projector\.linear_3\.weight"):
        convert_checkpoint("hf-llava", bad, tmp_path / "o2")
    bad = _copy_checkpoint(src, tmp_path / "shape", lambda s: s.update({"multi_modal_projector.linear_1.bias":
                                                                        torch.zeros(5)}))
    with pytest.raises(ConversionError, match=r"shape mismatches.*linear_1\.bias: \(5,\)"):
        convert_checkpoint("hf-llava", bad, tmp_path / "o3")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()  # nothing written


def test_bin_shards_with_index_and_dtype(tmp_path, hf_llava):
    """pytorch_model-*.bin shards with an index (LLaVA's release layout), stored bf16: auto keeps bf16."""
    import shutil

    from safetensors.torch import load_file

    _hf, _tok, src, _out, _ = hf_llava
    d = tmp_path / "bin"
    shutil.copytree(src, d)
    state = {k: v.to(torch.bfloat16) for k, v in load_file(d / "model.safetensors").items()}
    (d / "model.safetensors").unlink()
    names = sorted(state)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(shards, 1):
        fname = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: state[k] for k in part}, d / fname)
        weight_map.update({k: fname for k in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    report = convert_checkpoint("hf-llava", d, tmp_path / "out")
    assert report.dtype == "bfloat16" and len(report.files) == 2 and report.loaded == len(state)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("visual.mm_projector.0.weight").dtype == torch.bfloat16
    report = convert_checkpoint("hf-llava", d, tmp_path / "out32", dtype="float32")
    assert report.dtype == "float32"


def test_model_is_built_directly_in_the_target_dtype(hf_llava):
    _hf, tok, src, _out, _ = hf_llava
    model, report = build_converted("hf-llava", src, dtype="bfloat16")
    assert report.dtype == "bfloat16" and torch.get_default_dtype() == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert "dtype" not in model.config.text_config and "dtype" not in model.config.vision_config
    with torch.no_grad():
        out = model([ids_of(tok, PROMPTS[0])], [[model.prepare_image(noise_image((300, 200)))]])
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_processor_chat_template_is_carried(tmp_path, hf_llava):
    import shutil

    _hf, _tok, src, _out, _ = hf_llava
    d = tmp_path / "tpl"
    shutil.copytree(src, d)
    for f in d.glob("chat_template.jinja"):
        f.unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    template = "{% for m in messages %}{{ m['role'].upper() + ': ' + m['content'] + ' ' }}{% endfor %}"
    (d / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    report = convert_checkpoint("hf-llava", d, tmp_path / "out")
    assert any("processor's chat_template" in n for n in report.notes)
    assert HiresLMM.from_pretrained(tmp_path / "out").tokenizer.chat_template == template


# =========================================================================== reference repositories

#: Reference parameter names and shapes, read from each repository's model code (independent of
#: the converter's tables). d = 32 (tiny CLIP width), D = 64 (tiny LLM width), C = 128 (tiny
#: ConvNeXt stage-4 channels).
REFERENCE_NAMES: dict[str, dict[str, tuple[int, ...]]] = {
    # haotian-liu/LLaVA llava/model: llava_arch.py (LlavaMetaModel.vision_tower / mm_projector /
    # image_newline), multimodal_encoder/clip_encoder.py (CLIPVisionTower.vision_tower =
    # CLIPVisionModel), multimodal_projector/builder.py (mlp2x_gelu = Sequential(Linear, GELU, Linear))
    "llava": {
        "model.mm_projector.0.weight": (64, 32), "model.mm_projector.0.bias": (64,),
        "model.mm_projector.2.weight": (64, 64), "model.mm_projector.2.bias": (64,),
        "model.vision_tower.vision_tower.vision_model.embeddings.class_embedding": (32,),
        "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight": (32, 3, 14, 14),
        "model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight": (577, 32),
        "model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight": (32,),
        "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight": (32, 32),
        "model.vision_tower.vision_tower.vision_model.post_layernorm.bias": (32,),
        "model.embed_tokens.weight": (261, 64), "model.layers.1.mlp.down_proj.weight": (64, 128),
        "model.norm.weight": (64,), "lm_head.weight": (261, 64),
    },
    "llava-next": {"model.image_newline": (64,), "model.mm_projector.2.weight": (64, 64)},
    # thunlp/LLaVA-UHD branch LLaVA-UHD-v1: multimodal_projector/adapt_spatial_resampler.py
    # (AdaptSpatialResampler: pos_embed, query, kv_proj (bias=False), attn = nn.MultiheadAttention,
    # ln_q, ln_kv, ln_post, proj = Parameter(embed_dim, embed_dim)); builder.py: 144 queries
    "llava-uhd": {
        "model.mm_projector.query": (144, 64), "model.mm_projector.pos_embed": (144, 64),
        "model.mm_projector.kv_proj.weight": (64, 32), "model.mm_projector.attn.in_proj_weight": (192, 64),
        "model.mm_projector.attn.in_proj_bias": (192,), "model.mm_projector.attn.out_proj.weight": (64, 64),
        "model.mm_projector.ln_q.weight": (64,), "model.mm_projector.ln_kv.bias": (64,),
        "model.mm_projector.ln_post.weight": (64,), "model.mm_projector.proj": (64, 64),
        "model.vision_tower.vision_tower.vision_model.encoder.layers.3.mlp.fc2.weight": (32, 64),
    },
    # luogen1996/LLaVA-HR llava_hr/model/multimodal_encoder: multipath_encoder_wapper.py
    # (MultiPathCLIPVisionTower: fast_vision_tower / slow_vision_tower / align_stages_latent x3 of
    # S2FStitchAlignModuleV2 {slow_conv, slow_proj, fast_conv (depthwise 7x7), fast_proj, gate =
    # Sequential(Linear(2d, d/2), GELU, Linear(d/2, 1))} / align_stages = [MultiPathAlignModule
    # {fast_proj, slow_proj}]); convnext_encoder.py (ConvNextVisionTower.vision_tower = timm
    # ConvNeXt); convnext.py (ConvNeXtBlock layer scale `self.weight`, stem, stages.*.downsample)
    "llava-hr": {
        "model.vision_tower.fast_vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": (64, 32),
        "model.vision_tower.slow_vision_tower.vision_tower.stem.0.weight": (16, 3, 4, 4),
        "model.vision_tower.slow_vision_tower.vision_tower.stem.1.bias": (16,),
        "model.vision_tower.slow_vision_tower.vision_tower.stages.0.blocks.0.weight": (16,),
        "model.vision_tower.slow_vision_tower.vision_tower.stages.3.blocks.0.conv_dw.weight": (128, 1, 7, 7),
        "model.vision_tower.slow_vision_tower.vision_tower.stages.1.downsample.1.weight": (32, 16, 2, 2),
        "model.vision_tower.align_stages_latent.0.slow_conv.weight": (128, 128, 1, 1),
        "model.vision_tower.align_stages_latent.0.slow_proj.weight": (32, 128, 1, 1),
        "model.vision_tower.align_stages_latent.2.fast_conv.weight": (32, 1, 7, 7),
        "model.vision_tower.align_stages_latent.1.fast_proj.bias": (32,),
        "model.vision_tower.align_stages_latent.1.gate.0.weight": (16, 64),
        "model.vision_tower.align_stages_latent.1.gate.2.weight": (1, 16),
        "model.vision_tower.align_stages.0.fast_proj.weight": (32, 32),
        "model.vision_tower.align_stages.0.slow_proj.weight": (32, 128),
        "model.mm_projector.0.weight": (64, 32),
    },
    # WeihuangLin/INF-LLaVA INF_llava/model/llava_arch.py: LlavaMetaModel.spatial_embed = SpatialEmbed
    # {attention = MultiHeadedAttention(8, channel) {linears x4, ln}, ffn_crop / ffn_stride =
    # Sequential(Linear(c, c//16), GELU, Linear(c//16, c//2)), ln_fuse}
    "inf-llava": {
        "model.spatial_embed.attention.linears.0.weight": (32, 32),
        "model.spatial_embed.attention.linears.3.bias": (32,),
        "model.spatial_embed.attention.ln.weight": (32,),
        "model.spatial_embed.ffn_crop.0.weight": (2, 32), "model.spatial_embed.ffn_crop.2.weight": (16, 2),
        "model.spatial_embed.ffn_stride.2.bias": (16,), "model.spatial_embed.ln_fuse.weight": (32,),
        "model.mm_projector.0.weight": (64, 32),
    },
    # yfzhang114/SliME llava/model: multimodal_projector/builder.py (GatedBlock {attn = Resampler(576
    # queries, embed_dim = mm_hidden_size, use_post_proj=False), projection = Sequential(Linear, GELU,
    # Linear), w_gate, w_noise (mm_hidden, 2), buffers mean, std}); multimodal_resampler/builder.py
    # (TextGuidedSampler.post_qformer = Resampler(144 queries)); llava_arch.py (self.sampler)
    "slime": {
        "model.mm_projector.projection.0.weight": (64, 32), "model.mm_projector.projection.2.weight": (64, 64),
        "model.mm_projector.attn.query": (576, 32), "model.mm_projector.attn.pos_embed": (576, 32),
        "model.mm_projector.attn.attn.in_proj_weight": (96, 32),
        "model.mm_projector.attn.attn.out_proj.weight": (32, 32),
        "model.mm_projector.attn.ln_q.weight": (32,), "model.mm_projector.attn.ln_post.bias": (32,),
        "model.mm_projector.w_gate": (32, 2), "model.mm_projector.w_noise": (32, 2),
        "model.sampler.post_qformer.query": (144, 32), "model.sampler.post_qformer.pos_embed": (144, 32),
        "model.sampler.post_qformer.attn.in_proj_bias": (96,),
        "model.sampler.post_qformer.ln_kv.weight": (32,),
    },
}

_LLM = ((r"model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\.((self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
         r"\.weight|(input|post_attention)_layernorm\.weight|self_attn\.rotary_emb\.inv_freq))"), r"lm_head\.weight")
_CLIP = (r"(embeddings\.(class_embedding|patch_embedding\.weight|position_embedding\.weight)|"
         r"(pre_layrnorm|post_layernorm)\.(weight|bias)|"
         r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12]|layer_norm[12])\.(weight|bias))")
_MHA = r"attn\.(in_proj_weight|in_proj_bias|out_proj\.(weight|bias))"
#: Every reference name of each format, as regexes written from the reference code (independent of
#: the converter): our checkpoints may hold nothing else.
REFERENCE_PATTERNS: dict[str, tuple[str, ...]] = {
    "llava": (*_LLM, r"model\.vision_tower\.vision_tower\.vision_model\." + _CLIP, r"model\.mm_projector\.[02]\.(weight|bias)"),
    "llava-next": (*_LLM, r"model\.vision_tower\.vision_tower\.vision_model\." + _CLIP,
                   r"model\.mm_projector\.[02]\.(weight|bias)", r"model\.image_newline"),
    "llava-uhd": (*_LLM, r"model\.vision_tower\.vision_tower\.vision_model\." + _CLIP,
                  rf"model\.mm_projector\.(query|pos_embed|proj|kv_proj\.weight|{_MHA}|ln_(q|kv|post)\.(weight|bias))"),
    "llava-hr": (*_LLM, r"model\.vision_tower\.fast_vision_tower\.vision_tower\.vision_model\." + _CLIP,
                 (r"model\.vision_tower\.slow_vision_tower\.vision_tower\.(stem\.[01]\.(weight|bias)|"
                  r"stages\.\d+\.downsample\.[01]\.(weight|bias)|stages\.\d+\.blocks\.\d+\.(conv_dw\.(weight|bias)|"
                  r"norm\.(weight|bias)|mlp\.fc[12]\.(weight|bias)|weight)|head\.(norm|pre_logits\.fc|fc)\.(weight|bias))"),
                 r"model\.vision_tower\.align_stages_latent\.[012]\.(slow_conv|slow_proj|fast_conv|fast_proj|gate\.[02])\.(weight|bias)",
                 r"model\.vision_tower\.align_stages\.0\.(fast_proj|slow_proj)\.(weight|bias)",
                 r"model\.mm_projector\.[02]\.(weight|bias)"),
    "inf-llava": (*_LLM, r"model\.vision_tower\.vision_tower\.vision_model\." + _CLIP,
                  r"model\.mm_projector\.[02]\.(weight|bias)",
                  r"model\.spatial_embed\.(attention\.(linears\.[0-3]|ln)|ffn_crop\.[02]|ffn_stride\.[02]|ln_fuse)\.(weight|bias)"),
    "slime": (*_LLM, r"model\.vision_tower\.vision_tower\.vision_model\." + _CLIP,
              (rf"model\.mm_projector\.(projection\.[02]\.(weight|bias)|w_gate|w_noise|mean|std|"
               rf"attn\.(query|pos_embed|{_MHA}|ln_(q|kv|post)\.(weight|bias)))"),
              rf"model\.sampler\.post_qformer\.(query|pos_embed|{_MHA}|ln_(q|kv|post)\.(weight|bias))"),
}


#: the method and the tiny model's connector overrides of each format (heads as the reference
#: computes them: width // 128 → 1 at toy widths; INF-LLaVA: 8 heads, bottleneck channel // 16;
#: SliME: the selector of the code its checkpoints were published with)
FORMAT_MODELS = {
    "llava": ("llava-1.5", {}),
    "llava-next": ("llava-next", {}),
    "llava-uhd": ("llava-uhd", {"heads": 1}),
    "llava-hr": ("llava-hr", {}),
    "inf-llava": ("inf-llava", {"heads": 8, "bottleneck": 2}),
    "slime": ("slime", {"heads": 1, "selector_variant": "released"}),
}


def llava_config(model: HiresLMM, vision_dir: Path, **fields) -> dict:
    """A haotian-liu/LLaVA style config.json: the LLM's fields plus the mm_* fields the code reads."""
    text = {k: v for k, v in model.llm.config.to_dict().items() if k not in ("architectures", "model_type", "dtype")}
    return {**text, "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
            "mm_vision_tower": str(vision_dir), "mm_hidden_size": 32, "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu", "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False, "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
            "tune_mm_mlp_adapter": False, "use_mm_proj": True, "tokenizer_padding_side": "right",
            "tokenizer_model_max_length": 2048, "torch_dtype": "float32", "transformers_version": "4.37.2",
            **fields}


def reference_fields(fmt: str) -> dict:
    if fmt == "llava-next":
        return {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
                "image_grid_pinpoints": [list(p) for p in LLAVA_PINPOINTS]}
    if fmt == "llava-uhd":
        return {"mm_projector_type": "adapt_spatial_resampler"}
    if fmt == "llava-hr":
        return {"is_multipath_encoder": True, "vision_tower_slow": "convnext_large_mlp.clip_laion2b_ft_320",
                "input_image_size": 1024, "freeze_vision": False, "delay_load": True}
    if fmt == "slime":
        return {"mm_projector_type": "gated", "mm_patch_merge_type": "spatial", "image_aspect_ratio": "anyres",
                "image_grid_pinpoints": [list(p) for p in LLAVA_PINPOINTS], "mm_resampler_type": "cosine",
                "mm_resampler_topp": 0.95, "mm_resampler_dim": 144, "mm_resampler_temp": 1.0,
                "mm_learnable_gated": -1, "use_local_only": False, "use_global_only": False}
    return {}


def reference_extras(fmt: str) -> dict[str, torch.Tensor]:
    """Tensors a reference checkpoint holds that the model never uses (dropped, reported)."""
    out = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}  # transformers 4.28-4.30 Llama
    if fmt == "llava-hr":  # timm convnext_large_mlp's NormMlpClassifierHead
        p = "model.vision_tower.slow_vision_tower.vision_tower.head."
        out |= {p + "norm.weight": torch.ones(128), p + "norm.bias": torch.zeros(128),
                p + "pre_logits.fc.weight": torch.zeros(128, 128), p + "fc.weight": torch.zeros(10, 128)}
    if fmt == "slime":  # GatedBlock's registered buffers
        out |= {"model.mm_projector.mean": torch.tensor([0.0]), "model.mm_projector.std": torch.tensor([1.0])}
    return out


def write_reference(root: Path, fmt: str, model: HiresLMM, *, vision_dir: Path, fields: dict | None = None,
                    without: tuple[str, ...] = (), shards: int = 2) -> Path:
    """Our tiny model's weights under the reference's names, as pytorch_model-*.bin shards + index."""
    from transformers import CLIPVisionConfig

    file_fmt = "llava" if fmt == "llava-next" else fmt
    state = layout_for(file_fmt).export(model._dedup_state_dict())
    state |= reference_extras(fmt)
    state = {k: v for k, v in state.items() if not k.startswith(without)}
    d = root / f"ref-{fmt}"
    d.mkdir(parents=True)
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k].clone() for k in part}, d / fname)
        weight_map |= {k: fname for k in part}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = llava_config(model, vision_dir, **reference_fields(fmt))
    cfg |= {"seperator": model.separator_ids[","]} if fmt == "slime" else {}
    cfg |= fields or {}
    (d / "config.json").write_text(json.dumps(cfg))
    model.tokenizer.save_pretrained(d)
    if not vision_dir.exists():
        CLIPVisionConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"}).save_pretrained(vision_dir)
    return d


def tiny(fmt: str, seed: int = 0) -> HiresLMM:
    method, overrides = FORMAT_MODELS[fmt]
    model = build_model(method, tiny=True, seed=seed, **overrides)
    if fmt == "llava-next":  # haotian-liu/LLaVA reads its pinpoints as (w, h)
        model.config.plan_options["pinpoints"] = [list(p) for p in LLAVA_PINPOINTS]
    with torch.no_grad():  # make the zero-initialised parts matter
        for name, p in model.named_parameters():
            if name.endswith(("w_gate", "slow_proj.weight", "fast_proj.weight")) or "image_newline" in name:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each reference format: (original tiny model, converted model, report, source dir)."""
    out = {}
    for fmt in FORMAT_MODELS:
        root = tmp_path_factory.mktemp(fmt.replace("-", "_"))
        model = tiny(fmt)
        src = write_reference(root, fmt, model, vision_dir=root / "clip")
        file_fmt = "llava" if fmt == "llava-next" else fmt
        report = convert_checkpoint(file_fmt, src, root / "out")
        out[fmt] = (model, HiresLMM.from_pretrained(root / "out"), report, src)
    return out


@pytest.mark.parametrize("fmt", list(FORMAT_MODELS))
def test_reference_names_match_the_reference_sources(fmt, converted):
    """The names our checkpoints carry are the reference code's (spot-checked by hand)."""
    _model, _conv, _report, src = converted[fmt]
    from hires_lmm.convert import read_state_dict

    state, _ = read_state_dict(src)
    expect = dict(REFERENCE_NAMES["llava"])
    if fmt == "llava-next":
        expect |= REFERENCE_NAMES["llava-next"]
    elif fmt != "llava":
        expect = {k: v for k, v in expect.items() if not k.startswith("model.mm_projector")}
        if fmt == "llava-hr":  # the CLIP tower sits under fast_vision_tower there
            expect = {k: v for k, v in expect.items() if not k.startswith("model.vision_tower.")}
        expect |= REFERENCE_NAMES[fmt]
    for name, shape in expect.items():
        assert name in state, (fmt, name)
        assert tuple(state[name].shape) == shape, (fmt, name, tuple(state[name].shape))


@pytest.mark.parametrize("fmt", list(FORMAT_MODELS))
def test_every_reference_name_is_one_the_reference_code_has(fmt, converted):
    from hires_lmm.convert import read_state_dict

    state, _ = read_state_dict(converted[fmt][3])
    odd = [k for k in state if not any(re.fullmatch(p, k) for p in REFERENCE_PATTERNS[fmt])]
    assert not odd, odd[:10]


@pytest.mark.parametrize("fmt", list(FORMAT_MODELS))
def test_reference_checkpoint_converts_loads_and_answers(fmt, converted):
    model, conv, report, src = converted[fmt]
    assert report.method == model.config.method
    assert report.loaded == len(model._dedup_state_dict())  # every weight came from the checkpoint
    assert sum(report.dropped.values()) == len(reference_extras(fmt))  # buffers / unused heads only
    assert report.tensors == report.loaded + sum(report.dropped.values())
    assert {k: conv.config.connector[k] for k in model.config.connector} == model.config.connector
    assert conv.config.plan_options == model.config.plan_options
    assert detect_format(json.loads((src / "config.json").read_text()),
                         set(json.loads((src / "pytorch_model.bin.index.json").read_text())["weight_map"])) == \
        ("llava" if fmt == "llava-next" else fmt)
    sizes = [(500, 375), (300, 900)] if fmt in ("llava-hr", "inf-llava") else [(500, 375), (300, 900), (1024, 768)]
    prompt = "USER: <image>\nWhat is the colour of the dot? ASSISTANT:"
    for k, size in enumerate(sizes):
        img = noise_image(size, 20 + k)
        ids = ids_of(model.tokenizer, prompt)
        with torch.no_grad():
            a = model([ids], [[model.prepare_image(img)]])
            b = conv([ids], [[conv.prepare_image(img)]])
        assert a.batch.num_visual_tokens == b.batch.num_visual_tokens
        assert (a.logits - b.logits).abs().max().item() < 1e-5, (fmt, size)
    img = noise_image((640, 480), 30)
    answer = conv.generate(["<image>\nWhat is shown?"], [[img]], max_new_tokens=4)
    assert answer == model.generate(["<image>\nWhat is shown?"], [[img]], max_new_tokens=4)
    assert isinstance(answer[0], str)


@pytest.mark.parametrize("fmt", list(FORMAT_MODELS))
def test_layouts_round_trip_every_name(fmt):
    model = tiny(fmt)
    layout = layout_for("llava" if fmt == "llava-next" else fmt)
    for name in model.state_dict():
        assert layout.to_hires(layout.to_reference(name)) == name


def test_llava_hr_names_agree_with_dual_path_encoder_converter(converted):
    """The converter's LLaVA-HR table and DualPathEncoder.convert_reference_state_dict agree."""
    from hires_lmm.convert import read_state_dict

    model, _conv, _report, src = converted["llava-hr"]
    state, _ = read_state_dict(src)
    theirs = model.visual.vision_tower.convert_reference_state_dict(state, prefix="model.vision_tower.")
    layout = layout_for("llava-hr")
    ours = {layout.to_hires(k)[len("visual.vision_tower."):]: v for k, v in state.items()
            if k.startswith("model.vision_tower.") and not layout.dropped(k)}
    assert set(ours) == set(theirs)


def test_llava_next_layout_uses_llavas_pinpoint_order(converted):
    model, conv, _report, _src = converted["llava-next"]
    assert conv.config.plan_options["pinpoints"] == [list(p) for p in LLAVA_PINPOINTS]
    assert conv.plan((200, 150)).extra["best_resolution"] == [336, 672]  # LLaVA's tie break (portrait)
    assert torch.equal(conv.visual.image_newline, model.visual.image_newline)


def test_llava_without_vision_weights_needs_the_tower(tmp_path):
    """Released LLaVA checkpoints omit the frozen CLIP tower; mm_vision_tower names it."""
    model = tiny("llava", seed=3)
    clip_dir = tmp_path / "clip-full"
    model.visual.vit.vision_tower.save_pretrained(clip_dir)
    src = write_reference(tmp_path, "llava", model, vision_dir=tmp_path / "clip-cfg",
                          fields={"mm_vision_tower": "openai/clip-vit-large-patch14-336"},
                          without=("model.vision_tower.",))
    with pytest.raises(ConversionError, match="--vision"):
        convert_checkpoint("llava", src, tmp_path / "o1")
    report = convert_checkpoint("llava", src, tmp_path / "o2", vision=clip_dir)
    assert report.external == {"vision_tower": str(clip_dir)}
    conv = HiresLMM.from_pretrained(tmp_path / "o2")
    img = noise_image((400, 300), 1)
    ids = ids_of(model.tokenizer, "<image> what?")
    with torch.no_grad():
        assert torch.allclose(model([ids], [[model.prepare_image(img)]]).logits,
                              conv([ids], [[conv.prepare_image(img)]]).logits, atol=1e-5)


def test_vision_config_read_off_the_weights(tmp_path):
    """mm_vision_tower not available locally but the weights are in the checkpoint."""
    model = tiny("llava", seed=4)
    src = write_reference(tmp_path, "llava", model, vision_dir=tmp_path / "clip",
                          fields={"mm_vision_tower": "some/clip-elsewhere"})
    mdl, report = build_converted("llava", src)
    assert any("read off the weights" in n for n in report.notes)
    cfg = mdl.config.vision_config
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["image_size"], cfg["patch_size"]) == (32, 4, 336, 14)


def test_llava_vocabulary_grows_for_the_image_placeholder(tmp_path):
    """A LLaVA tokenizer has no <image> (the reference splices at id -200): the converter adds it
    and grows the embeddings and the LM head by one mean row; text logits are unchanged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny("llava", seed=5)
    src = write_reference(tmp_path, "llava", model, vision_dir=tmp_path / "clip")
    # the same byte-level tokenizer without <image>, and the state without its row
    t = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                             merges=[], unk_token=None))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    base = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    assert base.convert_tokens_to_ids("<image>") in (None, base.unk_token_id)
    for f in src.glob("tokenizer*"):
        f.unlink()
    base.save_pretrained(src)
    n = len(base)
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())["weight_map"]
    for fname in set(index.values()):
        part = torch.load(src / fname)
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            if k in part:
                part[k] = part[k][:n].clone()
        torch.save(part, src / fname)
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = n
    (src / "config.json").write_text(json.dumps(cfg))
    mdl, report = build_converted("llava", src)
    assert report.vocab_padded == len(mdl.tokenizer) - n >= 1
    ids = ids_of(mdl.tokenizer, "plain text")
    with torch.no_grad():
        a = model.llm(input_ids=ids[None]).logits[0, :, :n]
        b = mdl.llm(input_ids=ids[None]).logits[0, :, :n]
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("fields, match", [
    ({"mm_resampler_temp": 0.5}, "temperature"),
    ({"mm_learnable_gated": 1}, "fixed expert"),
    ({"mm_patch_merge_type": "flat"}, "raster order"),
    ({"mm_resampler_type": "qformer"}, "cosine"),
])
def test_slime_variants_that_cannot_be_reproduced_are_refused(tmp_path, fields, match):
    model = tiny("slime", seed=6)
    src = write_reference(tmp_path, "slime", model, vision_dir=tmp_path / "clip", fields=fields)
    with pytest.raises(ConversionError, match=match):
        build_converted("slime", src)
    _mdl, report = build_converted("slime", src, force=True)
    assert any(n.startswith("FORCED") and match in n for n in report.notes)


def test_slime_config_fields_are_carried(tmp_path):
    model = tiny("slime", seed=7)
    src = write_reference(tmp_path, "slime", model, vision_dir=tmp_path / "clip",
                          fields={"mm_resampler_topp": 0.8, "seperator": 7})
    mdl, report = build_converted("slime", src)
    c = mdl.config.connector
    assert c["selector_p"] == 0.8 and c["local_queries"] == 144 and c["global_queries"] == 576
    assert c["selector_variant"] == "released" and mdl.visual.selector_variant == "released"
    assert any("2024-06" in n for n in report.notes)
    mdl, _ = build_converted("slime", src, connector={"selector_variant": "spec"})
    assert mdl.visual.selector_variant == "spec"
    assert c["separator_ids"] == {",": 7} and any("separator" in n for n in report.notes)


def test_slime_nan_pos_embed_is_rebuilt_as_the_reference_does(tmp_path):
    model = tiny("slime", seed=8)
    src = write_reference(tmp_path, "slime", model, vision_dir=tmp_path / "clip")
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())["weight_map"]
    name = "model.sampler.post_qformer.pos_embed"
    part = torch.load(src / index[name])
    part[name] = torch.full_like(part[name], float("nan"))
    torch.save(part, src / index[name])
    mdl, report = build_converted("slime", src)
    assert torch.equal(mdl.visual.sampler.pos_embed, model.visual.sampler.pos_embed)
    assert any("NaN" in n for n in report.notes)


def test_llava_hr_frozen_vision_has_no_adapters(tmp_path):
    """freeze_vision=True builds no MR-adapters in the reference: a checkpoint holding them is refused,
    one without them converts to adapters=False."""
    model = tiny("llava-hr", seed=9)
    src = write_reference(tmp_path, "llava-hr", model, vision_dir=tmp_path / "clip", fields={"freeze_vision": True})
    with pytest.raises(ConversionError, match="align_stages_latent"):
        build_converted("llava-hr", src)
    src2 = write_reference(tmp_path / "b", "llava-hr", model, vision_dir=tmp_path / "clip",
                           fields={"freeze_vision": True}, without=("model.vision_tower.align_stages_latent.",))
    mdl, _ = build_converted("llava-hr", src2)
    assert mdl.config.connector["adapters"] is False and mdl.config.plan_options == {"S": 1024}
    assert list(mdl.config.convnext_config["depths"]) == [1, 1, 1, 1]


def test_uhd_heads_follow_the_reference_rule(converted):
    _model, conv, report, _src = converted["llava-uhd"]
    assert any("29892" in n for n in report.notes)  # the reference's hard-coded Llama separator ids
    assert conv.config.connector == {"resampler": "spatial", "grid": 12, "heads": 1}  # hidden_size // 128, ≥ 1
    assert conv.visual.mm_projector.attn.num_heads == 1


def test_inf_llava_bottleneck_and_variant_from_the_checkpoint(converted):
    _model, conv, _report, _src = converted["inf-llava"]
    assert conv.config.connector == {"projector": "mlp2x_gelu", "heads": 8, "bottleneck": 2, "variant": "code"}
    dem = conv.visual.spatial_embed.spatial_embed
    assert dem.attention.num_heads == 8 and dem.ffn_crop[0].out_features == 2


def test_index_naming_files_outside_the_checkpoint_is_refused(tmp_path, hf_next):
    """Issue 14: a weights index pointing at ../elsewhere must not be read (nor torch.load-ed)."""
    import shutil

    from hires_lmm.convert.io import weight_files

    _hf, _tok, src, _out, _ = hf_next
    ck = tmp_path / "ck"
    shutil.copytree(src, ck)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    shutil.move(ck / shard, tmp_path / shard)
    index["weight_map"] = {k: f"../{v}" if v == shard else v for k, v in index["weight_map"].items()}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"outside .*ck.*refused"):
        weight_files(ck)
    assert run_cli("convert", "--from", "auto", str(ck), str(tmp_path / "o")) == 2
    assert not (tmp_path / "o").exists()


def test_config_that_is_not_utf8_or_not_an_object_is_refused(tmp_path, hf_llava):
    import shutil

    from hires_lmm.convert.io import read_config

    _hf, _tok, src, _out, _ = hf_llava
    ck = tmp_path / "ck"
    shutil.copytree(src, ck)
    (ck / "config.json").write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(ConversionError, match=r"config.json: not UTF-8"):
        read_config(ck)
    (ck / "config.json").write_text("[1, 2]")
    with pytest.raises(ConversionError, match=r"config.json: expected a JSON object, got list"):
        read_config(ck)


def test_converted_directory_has_umask_permissions(hf_llava):
    """Issue 14: not mkdtemp's 0700 nor safetensors' 0600 (the fixture ran under this umask)."""
    import os

    _hf, _tok, _src, out, _ = hf_llava
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    files = list(out.iterdir())
    assert {"model.safetensors", "config.json", "conversion.json"} <= {f.name for f in files}
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
