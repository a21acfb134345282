"""``hires export``: hires-lmm llava-1.5 / llava-next → transformers' LLaVA directories.

Tiny models (``build_model(m, tiny=True)``) are saved, exported, and loaded with transformers' own
``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` and ``AutoProcessor``:
the processor's pixels equal hires-lmm's rendering, its ``<image>`` expansion the plan's token
count, the logits agree within 1e-4 (both fed the processor's pixels) and greedy generation gives
the same tokens. The other methods are refused; a failed export never touches an existing
directory; export → ``convert --from hf-llava(-next)`` gives the original logits back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import noise_image, run_cli
from PIL import Image

from hires_lmm.cli import main
from hires_lmm.convert import convert_checkpoint
from hires_lmm.convert.export import ExportError, export_checkpoint, verify_export
from hires_lmm.convert.export_targets import UNSUPPORTED
from hires_lmm.image.render import CLIP_MEAN, CLIP_STD
from hires_lmm.methods import build_model
from hires_lmm.model import HiresLMM, ImageInput
from hires_lmm.plan.anyres import LLAVA_PINPOINTS

ATOL = 1e-4
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


def _export(root: Path, method: str, to: str, *, seed: int, pinpoints=None):
    model = build_model(method, tiny=True, seed=seed)
    if pinpoints is not None:
        model.config.plan_options["pinpoints"] = [list(p) for p in pinpoints]
    src, dst = root / "src", root / "hf"
    model.save_pretrained(src)
    report = export_checkpoint(src, dst, to=to)
    return HiresLMM.from_pretrained(src), src, dst, report


@pytest.fixture(scope="module")
def ex15(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("ex15"), "llava-1.5", "hf-llava", seed=0)


@pytest.fixture(scope="module")
def exnext(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("exnext"), "llava-next", "hf-llava-next", seed=1)


def _load_hf(dst: Path, to: str):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    cls = LlavaForConditionalGeneration if to == "hf-llava" else LlavaNextForConditionalGeneration
    return cls.from_pretrained(str(dst)).eval(), AutoProcessor.from_pretrained(str(dst), backend="pil")


@pytest.fixture(scope="module")
def hf15(ex15):
    return _load_hf(ex15[2], "hf-llava")


@pytest.fixture(scope="module")
def hfnext(exnext):
    return _load_hf(exnext[2], "hf-llava-next")


def _compare(model: HiresLMM, hf, proc, img: Image.Image, prompt: str = PROMPT) -> float:
    """Logits of both models on the processor's pixels; also checks the pixels and token count."""
    enc = proc(text=prompt, images=img, return_tensors="pt")
    px = enc["pixel_values"]
    plan = model.plan(img.size)
    views = list(px[0][:len(plan.views)]) if px.ndim == 5 else [px[0]]
    mine = model.prepare_image(img).views
    assert len(views) == len(mine)
    assert (torch.stack(views) - torch.stack(mine)).abs().max().item() < 1e-5  # the same pixels
    assert int((enc["input_ids"] == hf.config.image_token_id).sum()) == plan.num_visual_tokens
    ids = torch.tensor(model.tokenizer(prompt).input_ids, dtype=torch.long)
    kw = {"image_sizes": enc["image_sizes"]} if "image_sizes" in enc else {}
    with torch.no_grad():
        ours = model([ids], [[ImageInput(plan, views)]]).logits
        ref = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px, **kw).logits
    assert ours.shape == ref.shape
    return (ours - ref).abs().max().item()


# =========================================================================== llava-1.5 → LlavaForConditionalGeneration


def test_llava15_export_config_files_and_hub_names(ex15):
    from safetensors import safe_open

    model, _src, dst, report = ex15
    cfg = json.loads((dst / "config.json").read_text())
    tok = model.tokenizer
    assert cfg["model_type"] == "llava" and cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["image_token_index"] == tok.convert_tokens_to_ids("<image>") == report.image_token_id
    assert cfg["vision_feature_layer"] == -2 and cfg["vision_feature_select_strategy"] == "default"
    assert cfg["projector_hidden_act"] == "gelu" and cfg["image_seq_length"] == 576
    text = cfg["text_config"]
    assert text["model_type"] == "llama" and text["vocab_size"] == len(tok)
    assert (text["bos_token_id"], text["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert json.loads((dst / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    pre = json.loads((dst / "preprocessor_config.json").read_text())
    assert pre["do_pad"] is True and pre["crop_size"] == {"height": 336, "width": 336}
    assert pre["image_mean"] == list(CLIP_MEAN) and pre["image_std"] == list(CLIP_STD)
    proc = json.loads((dst / "processor_config.json").read_text())
    assert proc["processor_class"] == "LlavaProcessor" and proc["num_additional_image_tokens"] == 1
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    # the names of transformers' llava-hf checkpoints on the Hub (what vLLM / SGLang / transformers 4 read)
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in names
    assert {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias",
            "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"} <= names
    assert len(names) == len(model.state_dict()) == report.tensors
    assert json.loads((dst / "export.json").read_text())["method"] == "llava-1.5"


@pytest.mark.parametrize("size", [(500, 375), (300, 900), (336, 336), (1200, 90)])
def test_llava15_logits_match_transformers(ex15, hf15, size):
    model = ex15[0]
    hf, proc = hf15
    assert _compare(model, hf, proc, noise_image(size, 3)) < ATOL


def test_llava15_two_images_in_one_prompt(ex15, hf15):
    model = ex15[0]
    hf, proc = hf15
    imgs = [noise_image((640, 480), 4), noise_image((200, 500), 5)]
    prompt = "First <image> then <image>; which is brighter?"
    enc = proc(text=prompt, images=imgs, return_tensors="pt")
    ims = [ImageInput(model.plan(im.size), [enc["pixel_values"][i]]) for i, im in enumerate(imgs)]
    ids = torch.tensor(model.tokenizer(prompt).input_ids, dtype=torch.long)
    with torch.no_grad():
        ours = model([ids], [ims]).logits
        ref = hf(**enc).logits
    assert (ours - ref).abs().max().item() < ATOL


def test_llava15_processor_pads_to_square_in_the_mean_colour(ex15):
    """AutoProcessor's default (PIL here: torchvision is not installed) pads to a square like
    LLaVA-1.5, not transformers' usual shortest-edge resize + centre crop."""
    from transformers import AutoProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    _model, _src, dst, _ = ex15
    proc = AutoProcessor.from_pretrained(str(dst))
    img = noise_image((672, 336), 6)  # landscape: bands of 84 rows above and below at 336
    px = proc.image_processor(img, return_tensors="pt")["pixel_values"][0]
    mean = torch.tensor([(int(m * 255) / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    assert (px[:, :80, :] - mean[:, None, None]).abs().max() < 1e-5  # the padding band: the mean colour
    assert (px[:, 100:236, :] - mean[:, None, None]).abs().max() > 0.5  # the image
    crop = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))(img, return_tensors="pt")
    assert (crop["pixel_values"][0] - px).abs().max() > 0.5  # a centre crop would differ


# =========================================================================== llava-next → LlavaNextForConditionalGeneration


def test_llava_next_export_config(exnext):
    from hires_lmm.plan import NEXT_PINPOINTS

    model, _src, dst, report = exnext
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "llava_next" and cfg["architectures"] == ["LlavaNextForConditionalGeneration"]
    # the planner's (w, h) pinpoints as transformers' (h, w), in the planner's order
    assert cfg["image_grid_pinpoints"] == [[h, w] for w, h in NEXT_PINPOINTS] == report.pinpoints
    pre = json.loads((dst / "preprocessor_config.json").read_text())
    assert pre["image_grid_pinpoints"] == cfg["image_grid_pinpoints"]
    hf, _ = _load_hf(dst, "hf-llava-next")
    assert torch.equal(hf.model.image_newline, model.visual.image_newline)


@pytest.mark.parametrize("size", [(500, 375), (300, 900), (1000, 300), (200, 150), (1024, 1024), (700, 400)])
def test_llava_next_logits_match_transformers(exnext, hfnext, size):
    """Aspect ratios where the pinpoint choice differs, unpadding drops rows (1000x300) or columns
    (300x900), every pinpoint ties (200x150) or none pads (1024x1024)."""
    model = exnext[0]
    hf, proc = hfnext
    assert _compare(model, hf, proc, noise_image(size, 7)) < ATOL


def test_llava_next_pinpoint_order_decides_ties_the_same(tmp_path):
    """LLaVA's own order (portrait 336x672 first): a small image fits every pinpoint whole, so the
    first listed wins; transformers must pick the same one (the token count tells)."""
    model, _src, dst, report = _export(tmp_path, "llava-next", "hf-llava-next", seed=2, pinpoints=LLAVA_PINPOINTS)
    assert report.pinpoints == [[h, w] for w, h in LLAVA_PINPOINTS]
    img = noise_image((200, 150), 2)
    assert model.plan(img.size).extra["best_resolution"] == [336, 672]
    assert model.plan(img.size).num_visual_tokens != build_model("llava-next", tiny=True).plan(img.size).num_visual_tokens
    hf, proc = _load_hf(dst, "hf-llava-next")
    assert _compare(model, hf, proc, img) < ATOL


def _tiny_variant(method: str, *, siglip: bool = False, tied: bool = False) -> HiresLMM:
    from hires_lmm.methods import build_from_config, tiny_config
    from hires_lmm.text import build_byte_tokenizer

    torch.manual_seed(3)
    tok = build_byte_tokenizer()
    cfg = tiny_config(method, len(tok))
    if siglip:
        cfg.vision_config = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 336, "patch_size": 14}
    cfg.text_config["tie_word_embeddings"] = tied
    return build_from_config(cfg, tok).eval()


@pytest.mark.parametrize(("method", "to", "siglip", "tied"), [("llava-next", "hf-llava-next", True, False),
                                                              ("llava-1.5", "hf-llava", False, True)])
def test_siglip_tower_and_tied_embeddings_export_verified(tmp_path, method, to, siglip, tied):
    """SigLIP has no CLS: strategy "full", no extra image token; a tied LM head is stored once.
    ``verify=True`` checks logits, pixels and the <image> expansion on five image sizes."""
    from safetensors import safe_open

    _tiny_variant(method, siglip=siglip, tied=tied).save_pretrained(tmp_path / "src")
    report = export_checkpoint(tmp_path / "src", tmp_path / "hf", to=to, verify=True)
    assert report.verify["max_logit_diff"] < ATOL and len(report.verify["sizes"]) == 5
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    proc = json.loads((tmp_path / "hf" / "processor_config.json").read_text())
    assert cfg["vision_feature_select_strategy"] == ("full" if siglip else "default")
    assert proc["num_additional_image_tokens"] == (0 if siglip else 1)
    assert cfg["tie_word_embeddings"] is tied
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert ("language_model.lm_head.weight" in set(f.keys())) is not tied


# =========================================================================== generation, chat template


def _greedy_hires(model: HiresLMM, prompt: str, img: Image.Image, steps: int) -> list[int]:
    """Greedy tokens from hires-lmm's forward (no cache), stopping at EOS as generate does."""
    im = model.prepare_image(img)
    ids = model.tokenizer(prompt).input_ids
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model([torch.tensor(ids + out, dtype=torch.long)], [[im]]).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] == model.tokenizer.eos_token_id:
            break
    return out


@pytest.mark.parametrize("which", ["llava-1.5", "llava-next"])
def test_processor_output_feeds_generate_with_the_same_greedy_tokens(which, ex15, hf15, exnext, hfnext):
    model, _src, _dst, _ = ex15 if which == "llava-1.5" else exnext
    hf, proc = hf15 if which == "llava-1.5" else hfnext
    img = noise_image((640, 360), 12)
    enc = proc(text=PROMPT, images=img, return_tensors="pt")
    with torch.no_grad():
        seq = hf.generate(**enc, max_new_tokens=6, do_sample=False)
    theirs = seq[0, enc["input_ids"].shape[1]:].tolist()
    ours = _greedy_hires(model, PROMPT, img, 6)
    assert theirs == ours and len(ours) >= 1
    text = model.generate([PROMPT], [[img]], max_new_tokens=6)[0]  # hires-lmm's own decoder agrees
    assert text == model.tokenizer.decode([t for t in ours if t != model.tokenizer.eos_token_id],
                                          skip_special_tokens=True)


def test_chat_template_renders_processor_messages_as_the_model_was_trained(ex15, hf15):
    model = ex15[0]
    _hf, proc = hf15
    question = "What is in the picture?"
    trained = model.tokenizer.apply_chat_template([{"role": "user", "content": f"<image>\n{question}"}],
                                                  tokenize=False, add_generation_prompt=True)
    typed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    assert proc.apply_chat_template(typed, add_generation_prompt=True) == trained
    assert proc.tokenizer.apply_chat_template([{"role": "user", "content": f"<image>\n{question}"}],
                                              tokenize=False, add_generation_prompt=True) == trained
    two = [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"},
                                        {"type": "text", "text": "these."}]}]
    assert "USER: <image>\n<image>\nCompare these. " in proc.apply_chat_template(two, add_generation_prompt=True)


# =========================================================================== refusals


@pytest.mark.parametrize("method", sorted(UNSUPPORTED))
def test_methods_transformers_cannot_represent_are_refused(tmp_path, method):
    """Refused from config.json alone, before any weight is read, naming what is missing."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "hires_lmm", "method": method}))
    for to in ("hf-llava", "hf-llava-next"):
        with pytest.raises(ExportError, match=f"{method} cannot be exported") as e:
            export_checkpoint(src, tmp_path / "out", to=to)
        assert UNSUPPORTED[method] in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_refused_for_a_real_model_and_for_the_wrong_target(tmp_path, ex15):
    model = build_model("llava-hr", tiny=True)
    model.save_pretrained(tmp_path / "hr")
    with pytest.raises(ExportError, match="dual vision encoders"):
        export_checkpoint(tmp_path / "hr", tmp_path / "o", to="hf-llava")
    with pytest.raises(ExportError, match=r"this model is llava-1.5 \(use --to hf-llava\)"):
        export_checkpoint(ex15[1], tmp_path / "o", to="hf-llava-next")
    lin = build_model("llava-1.5", tiny=True, projector="linear")
    lin.save_pretrained(tmp_path / "lin")
    with pytest.raises(ExportError, match="projector 'linear'"):
        export_checkpoint(tmp_path / "lin", tmp_path / "o", to="hf-llava")
    raw = json.loads((ex15[1] / "config.json").read_text())
    bad = tmp_path / "side"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**raw, "plan_options": {"side": 448, "patch": 14}}))
    with pytest.raises(ExportError, match="448px views .* tower is 336px/14"):
        export_checkpoint(bad, tmp_path / "o", to="hf-llava")  # refused from the config alone
    with pytest.raises(ExportError, match="not 'hires_lmm'"):
        export_checkpoint(ex15[2], tmp_path / "o", to="hf-llava")  # already a transformers directory
    assert not (tmp_path / "o").exists()


# =========================================================================== CLI


def test_cli_export_verify_and_errors(tmp_path, capsys, ex15):
    _model, src, _dst, _ = ex15
    out = tmp_path / "out"
    assert run_cli("export", "--to", "hf-llava", str(src), str(out), "--verify", "--json") == 0
    rep = json.loads(capsys.readouterr()[0].strip().splitlines()[-1])  # the report is the last line
    assert rep["architecture"] == "LlavaForConditionalGeneration" and rep["dst"] == str(out)
    assert rep["verify"]["max_logit_diff"] < ATOL and rep["verify"]["max_pixel_diff"] < 1e-5
    assert (out / "model.safetensors").is_file()
    # errors: one line, exit status 2
    assert run_cli("export", "--to", "hf-llava", str(src), str(out)) == 2
    err = capsys.readouterr()[1]
    assert "not empty" in err and err.count("\n") == 1
    assert run_cli("export", "--to", "hf-llava", str(tmp_path / "nope"), str(tmp_path / "o")) == 2
    assert "no such model directory" in capsys.readouterr()[1]
    slime = tmp_path / "slime"
    slime.mkdir()
    (slime / "config.json").write_text(json.dumps({"model_type": "hires_lmm", "method": "slime"}))
    assert run_cli("export", "--to", "hf-llava-next", str(slime), str(tmp_path / "o")) == 2
    err = capsys.readouterr()[1]
    assert err.startswith("hires export: error: slime cannot be exported") and err.count("\n") == 1
    assert "gated mixture of adapters" in err
    with pytest.raises(SystemExit) as e:
        run_cli("export", "--to", "gguf", str(src), str(tmp_path / "o"))
    assert e.value.code == 2


def test_hires_cli_has_export(capsys):
    """The real ``hires`` parser has ``export`` (hires_lmm.cli.EXTENSIONS → convert.cli.register)."""
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0 and "--to FORMAT" in capsys.readouterr()[0]


def test_verify_fails_when_the_models_differ(ex15):
    """The check has teeth: a perturbed hires-lmm model no longer matches the export."""
    model, src, dst, _ = ex15
    other = HiresLMM.from_pretrained(src)
    with torch.no_grad():
        other.visual.mm_projector[0].bias.add_(0.5)
    assert verify_export(other, dst, "hf-llava", sizes=((300, 200),))["max_logit_diff"] > 1e-2
    assert verify_export(model, dst, "hf-llava", sizes=((300, 200),))["max_logit_diff"] < ATOL


# =========================================================================== atomic writes, dtype, permissions


def test_existing_destination_is_never_half_overwritten(tmp_path, ex15, monkeypatch):
    import hires_lmm.convert.export as export_mod

    src = ex15[1]
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "config.json").write_text("old config")
    (dst / "old-weights.bin").write_bytes(b"old")
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(src, dst, to="hf-llava")

    def half_then_full_disk(state, root, max_shard_size):
        (root / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_mod, "_save_weights", half_then_full_disk)
    with pytest.raises(ExportError, match="No space left on device"):
        export_checkpoint(src, dst, to="hf-llava", overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "old-weights.bin"]
    assert (dst / "config.json").read_text() == "old config"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no temporary directory left
    monkeypatch.undo()
    export_checkpoint(src, dst, to="hf-llava", overwrite=True)  # replaced as a whole
    assert not (dst / "old-weights.bin").exists() and json.loads((dst / "config.json").read_text())["model_type"] == "llava"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_bfloat16_export_under_a_restrictive_umask(tmp_path, ex15):
    from safetensors import safe_open

    old = os.umask(0o027)
    try:
        export_checkpoint(ex15[1], tmp_path / "bf16", to="hf-llava", dtype="bfloat16")
    finally:
        os.umask(old)
    out = tmp_path / "bf16"
    assert out.stat().st_mode & 0o777 == 0o750
    assert all(f.stat().st_mode & 0o777 == 0o640 for f in out.iterdir())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


# =========================================================================== round trip


@pytest.mark.parametrize("which", ["llava-1.5", "llava-next"])
def test_round_trip_through_convert_gives_the_same_logits(tmp_path, which, ex15, exnext):
    model, _src, dst, _ = ex15 if which == "llava-1.5" else exnext
    fmt = "hf-llava" if which == "llava-1.5" else "hf-llava-next"
    report = convert_checkpoint(fmt, dst, tmp_path / "back")
    assert report.method == which and report.loaded == report.tensors == len(model.state_dict())
    back = HiresLMM.from_pretrained(tmp_path / "back")
    assert back.config.method == which
    ids = torch.tensor(model.tokenizer(PROMPT).input_ids, dtype=torch.long)
    for size in ((500, 375), (300, 900)):
        img = noise_image(size, 9)
        a_im, b_im = model.prepare_image(img), back.prepare_image(img)
        assert b_im.plan.num_visual_tokens == a_im.plan.num_visual_tokens
        with torch.no_grad():
            a = model([ids], [[a_im]]).logits
            b = back([ids], [[b_im]]).logits
        assert (a - b).abs().max().item() < ATOL
    assert back.tokenizer.chat_template  # carried both ways

