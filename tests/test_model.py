"""The composed model: visual token counts, splicing, batching, generation, save/load, real loading."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import rand_image
from PIL import Image

from hires_lmm.methods import build_model
from hires_lmm.model import IGNORE_INDEX, HiresLMM
from hires_lmm.plan import METHODS

SIZES = [(1, 1), (500, 375), (1024, 768), (300, 1200), (2000, 180)]




@pytest.fixture(scope="module")
def models() -> dict[str, HiresLMM]:
    return {m: build_model(m, tiny=True, seed=1) for m in METHODS}


def ids_of(model: HiresLMM, text: str) -> torch.Tensor:
    return torch.tensor(model.tokenizer(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("method", METHODS)
def test_actual_visual_tokens_equal_the_plan(models, method):
    model = models[method]
    for k, size in enumerate(SIZES):
        im = model.prepare_image(rand_image(size, k))
        with torch.no_grad():
            out = model([ids_of(model, "Look: <image>\nWhat is small?")], [[im]])
        n = out.batch.num_visual_tokens[0]
        if method == "slime":  # the selector keeps a question-dependent subset, within the bound
            assert 576 + 1 < n <= im.plan.num_visual_tokens
        else:
            assert n == im.plan.num_visual_tokens, (method, size)
        assert out.logits.shape[1] == n + len(ids_of(model, "Look: <image>\nWhat is small?")) - 1


def test_slime_selector_off_keeps_the_bound():
    model = build_model("slime", tiny=True, selector_p=1.0)
    im = model.prepare_image(rand_image((1024, 768)))
    with torch.no_grad():
        out = model([ids_of(model, "<image> hi")], [[im]])
    assert out.batch.num_visual_tokens == [im.plan.num_visual_tokens]


def test_labels_ignore_visual_tokens_and_loss_uses_text_only(models):
    model = models["llava-1.5"]
    ids = ids_of(model, "A <image> B C")
    labels = ids.clone()
    im = model.prepare_image(rand_image((200, 100)))
    batch = model.build_inputs([ids], [[im]], [labels])
    where = (ids == model.image_token_id).nonzero().item()
    assert (batch.labels[0, where:where + 576] == IGNORE_INDEX).all()
    assert batch.labels[0, where + 576:].tolist() == labels[where + 1:].tolist()
    assert batch.labels[0, :where].tolist() == labels[:where].tolist()


def test_uhd_spatial_schema_separators_are_the_tokenizers_embeddings(models):
    model = models["llava-uhd"]
    im = model.prepare_image(rand_image((1024, 768)))  # 3x2 slices
    with torch.no_grad():
        (seq,) = model.encode_images([im])
    emb = model.llm.get_input_embeddings().weight
    comma, newline = emb[model.separator_ids[","]], emb[model.separator_ids["\n"]]
    seps = [seq[144 * (k + 1) + k] for k in range(6)]
    expected = [comma, comma, newline, comma, comma, newline]
    for got, want in zip(seps, expected):
        assert torch.equal(got, want)
    assert model.separator_ids == {",": model.tokenizer.convert_tokens_to_ids(","),
                                   "\n": model.tokenizer.convert_tokens_to_ids("Ċ")}


@pytest.mark.parametrize("method", METHODS)
def test_batch_consistency(models, method):
    """An image's logits alone and inside a padded batch of other sizes agree."""
    model = models[method]
    a = model.prepare_image(rand_image((640, 480), 3))
    b = model.prepare_image(rand_image((300, 1200), 4))
    ids_a = ids_of(model, "<image>\nWhat is it?")
    ids_b = ids_of(model, "A longer question about <image> the second picture, and more text.")
    with torch.no_grad():
        alone = model([ids_a], [[a]]).logits[0]
        both = model([ids_b, ids_a], [[b], [a]]).logits[1]
    n = alone.shape[0]
    torch.testing.assert_close(both[:n], alone, atol=1e-4, rtol=1e-4)


def test_vit_called_once_per_distinct_view_size(models):
    model = models["llava-uhd"]
    calls = []
    hook = model.visual.vit.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    try:
        ims = [model.prepare_image(rand_image(s, k)) for k, s in enumerate([(1024, 768), (1024, 768), (672, 1088)])]
        sizes = {tuple(v.shape) for im in ims for v in im.views}
        with torch.no_grad():
            model.encode_images(ims)
    finally:
        hook.remove()
    assert len(calls) == len(sizes)  # slices of equal size across images share one call
    assert sum(c[0] for c in calls) == sum(len(im.views) for im in ims)


def test_several_images_per_prompt(models):
    model = models["llava-next"]
    ims = [model.prepare_image(rand_image(s, k)) for k, s in enumerate([(500, 375), (336, 1000)])]
    ids = ids_of(model, "First <image> then <image> compare.")
    with torch.no_grad():
        out = model([ids], [ims])
    assert out.batch.num_visual_tokens == [im.plan.num_visual_tokens for im in ims]
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        model([ids], [ims[:1]])


@pytest.mark.parametrize("method", METHODS)
def test_save_load_identical_logits(models, method, tmp_path):
    model = models[method]
    im = model.prepare_image(rand_image((900, 700), 5))
    ids = ids_of(model, "<image>\nWhat?")
    with torch.no_grad():
        before = model([ids], [[im]]).logits
    model.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["method"] == method and cfg["model_type"] == "hires_lmm" and cfg["text_config"]["model_type"] == "llama"
    loaded = HiresLMM.from_pretrained(tmp_path / "m")
    assert loaded.tokenizer.chat_template == model.tokenizer.chat_template
    with torch.no_grad():
        after = loaded([ids], [[loaded.prepare_image(rand_image((900, 700), 5))]]).logits
    assert torch.equal(before, after)


def test_sharded_save_and_refusal_of_mismatched_weights(models, tmp_path):
    model = models["llava-1.5"]
    model.save_pretrained(tmp_path / "m", max_shard_size="200KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = HiresLMM.from_pretrained(tmp_path / "m")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # a config that does not match the weights is refused, naming the weights
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["connector"]["projector"] = "linear"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mm_projector"):
        HiresLMM.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="config.json"):
        HiresLMM.from_pretrained(tmp_path / "nowhere")


def test_save_is_atomic_over_an_existing_directory(models, tmp_path, monkeypatch):
    model = models["llava-1.5"]
    model.save_pretrained(tmp_path / "m")
    good = (tmp_path / "m" / "model.safetensors").read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left behind


def test_generate_batch_matches_single_and_stops(models):
    model = models["llava-uhd"]
    imgs = [rand_image((1024, 768), 7), rand_image((200, 150), 8), rand_image((300, 1200), 9)]
    prompts = ["<image>\nRead the small print.", "<image> what?", "Describe <image> in detail please."]
    batch = model.generate(prompts, [[i] for i in imgs], max_new_tokens=12)
    single = [model.generate([p], [[i]], max_new_tokens=12)[0] for p, i in zip(prompts, imgs)]
    assert batch == single
    assert all(isinstance(t, str) for t in batch)
    # a stop string ends generation and is not part of the text
    full = model.generate(prompts[:1], [imgs[:1]], max_new_tokens=12)[0]
    if len(full) > 3:
        stop = full[2:4]
        cut = model.generate(prompts[:1], [imgs[:1]], max_new_tokens=12, stop=[stop])[0]
        assert cut == full[: full.find(stop)]


def test_generate_stop_strings_anywhere_in_a_long_output(models):
    """Stops are looked for in the last few tokens only; a stop completing late in a long output
    (beyond that window from the start) still cuts exactly where a search of the whole text would."""
    model = models["llava-uhd"]
    img = [[rand_image((640, 480), 11)]]
    full = model.generate(["<image> Go on."], img, max_new_tokens=48)[0]
    assert len(full) >= 30, full  # random weights: no EOS this early
    for k in (1, len(full) // 2, len(full) - 4):
        stop = full[k:k + 3]
        cut = model.generate(["<image> Go on."], img, max_new_tokens=48, stop=["@@never@@", stop])[0]
        assert cut == full[: full.find(stop)]


def test_generate_sampling_is_seeded(models):
    model = models["llava-1.5"]
    img = [[rand_image((400, 300), 1)]]
    a = model.generate(["<image> hi"], img, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = model.generate(["<image> hi"], img, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    c = model.generate(["<image> hi"], img, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=4)
    assert a == b and isinstance(c[0], str)


def test_generate_with_chat_template_and_text_only(models):
    model = models["slime"]
    out = model.generate(["Hello there"], None, max_new_tokens=4, chat=True)
    assert len(out) == 1


def test_build_from_local_hugging_face_directories(tmp_path):
    """Real sizes are built from local paths; here with tiny parts the test saves itself."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from hires_lmm.text import build_byte_tokenizer
    from hires_lmm.vision.convnext import ConvNeXt, ConvNeXtConfig

    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                            num_attention_heads=2, image_size=336, patch_size=14))
    clip.save_pretrained(tmp_path / "clip")
    tok = build_byte_tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096))
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    ConvNeXt(ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))).save_pretrained(tmp_path / "cnx")

    for method in ("llava-uhd", "llava-hr"):
        model = build_model(method, vision=tmp_path / "clip", llm=tmp_path / "llm",
                            convnext=tmp_path / "cnx" if method == "llava-hr" else None)
        vit_sd = model.visual.vit.vision_tower.state_dict()
        for k, v in clip.state_dict().items():
            assert torch.equal(vit_sd[k], v), k
        assert torch.equal(model.llm.get_input_embeddings().weight, llm.get_input_embeddings().weight)
        im = model.prepare_image(rand_image((800, 600)))
        with torch.no_grad():
            out = model([ids_of(model, "<image> ok")], [[im]])
        assert out.batch.num_visual_tokens == [im.plan.num_visual_tokens]
        model.save_pretrained(tmp_path / f"saved-{method}")
        again = HiresLMM.from_pretrained(tmp_path / f"saved-{method}")
        assert again.config.vision_config["hidden_size"] == 32

    with pytest.raises(ValueError, match="--convnext"):
        build_model("llava-hr", vision=tmp_path / "clip", llm=tmp_path / "llm")
    with pytest.raises(FileNotFoundError):
        build_model("llava-1.5", vision=tmp_path / "clip", llm=tmp_path / "missing")


def test_inspect_cli(capsys):
    from hires_lmm.cli import main

    assert main(["inspect", "--method", "slime", "--tiny", "--size", "1600x1200", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "slime" and info["encoder_side"] == 336
    assert info["planned_visual_tokens"] == 576 + 1 + 144 * 6
    assert 577 < info["num_visual_tokens"] <= info["planned_visual_tokens"]
    assert info["params"]["total"] == sum(v for k, v in info["params"].items() if k != "total")
    assert main(["inspect", "--method", "llava-hr", "--tiny", "--size", "800x600", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["planned_visual_tokens"] == info["num_visual_tokens"] == 1024
    assert main(["inspect", "--method", "llava-hr", "--size", "800x600"]) == 2


def test_prepare_image_fast_path(tmp_path):
    """``fast=True`` keeps the plan and view sizes; a small image (nothing to reduce) gives the exact
    pixels; a large JPEG is reduced (a few grey levels off); bad files raise the loader's errors."""
    from hires_lmm.image import ImageLoadError, ImageTooLargeError
    from hires_lmm.model import prepare_image

    small, big = tmp_path / "small.png", tmp_path / "big.jpg"
    rand_image((500, 375), 1).save(small)
    rand_image((160, 120), 2).resize((4800, 3600), Image.BILINEAR).save(big, quality=90)
    a, b = prepare_image(small, "llava-next"), prepare_image(small, "llava-next", fast=True)
    assert a.plan == b.plan and all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    a, b = prepare_image(big, "llava-next"), prepare_image(big, "llava-next", fast=True)
    assert a.plan == b.plan and [v.shape for v in a.views] == [v.shape for v in b.views]
    d = torch.cat([(x - y).abs().flatten() for x, y in zip(a.views, b.views)])
    assert 0 < float(d.max()) < 0.2 and float(d.mean()) < 0.01
    with pytest.raises(ImageTooLargeError):
        prepare_image(big, "llava-next", fast=True, max_pixels=1_000_000)
    (tmp_path / "cut.jpg").write_bytes(big.read_bytes()[:3000])
    with pytest.raises(ImageLoadError):
        prepare_image(tmp_path / "cut.jpg", "llava-next", fast=True)


# --- composed methods: the counts announced before encoding are the ones spliced -----------------

#: the two composed methods of docs/adding-a-method.md (the selector kept whole, so its bound is exact)
COMPOSED = {"next-uhd": {"base": "llava-next", "compressor": "uhd-spatial"},
            "uhd-select": {"base": "llava-uhd", "selector": "text-guided", "selector_options": {"selector_p": 1.0}}}
COMPOSED_SIZES = [(336, 336), (1000, 700), (300, 1200)]


@pytest.fixture(scope="module")
def composed_models() -> dict[str, HiresLMM]:
    return {name: build_model(spec, tiny=True, seed=0) for name, spec in COMPOSED.items()}


def _spliced(model: HiresLMM, inputs) -> list[int]:  # noqa: ANN001 - a BatchFeature
    with torch.no_grad():
        return model(**inputs).batch.num_visual_tokens


@pytest.mark.parametrize("name", COMPOSED)
def test_composed_processor_counts_are_the_spliced_counts(composed_models, name, tmp_path):
    """The processor's count (``num_visual_tokens``, ``_get_num_multimodal_tokens``), the model's
    ``prepare_image`` plan (exact and fast) and the tensors' forward agree, with and without a
    budget in ``plan_options``, for both composed methods of docs/adding-a-method.md."""
    from hires_lmm.parts import spec_from_config
    from hires_lmm.plan import plan_image
    from hires_lmm.plan.budget import BudgetError

    model = composed_models[name]
    spec = spec_from_config(model.config)
    text = "Look: <image>\nWhat is small?"
    saved = model.config.plan_options
    try:
        for k, size in enumerate(COMPOSED_SIZES):
            img = rand_image(size, k)
            path = tmp_path / f"{k}.jpg"
            img.save(path, quality=95)
            full = spec.plan(size).num_visual_tokens
            for budget in (None, full - 1):
                model.config.plan_options = {**saved, **({} if budget is None else {"max_visual_tokens": budget})}
                proc = model.processor()
                try:
                    announced = proc.num_visual_tokens([size])[0]
                except BudgetError:  # a budget below the smallest configuration: refused by all alike
                    with pytest.raises(BudgetError):
                        model.prepare_image(img)
                    continue
                assert announced == spec.plan(size, **model.config.plan_options).num_visual_tokens
                if budget is not None:
                    assert announced <= budget
                mm = proc._get_num_multimodal_tokens(image_sizes=[(size[1], size[0])])
                assert mm["num_image_tokens"] == [announced]
                # the processor's tensors through the model's forward
                assert _spliced(model, proc(text=[text], images=[img])) == [announced], (name, size, budget)
                # the list interface, exact and fast pixels
                for im in (model.prepare_image(img), model.prepare_image(path, fast=True), model.prepare_image(path)):
                    assert im.plan.num_visual_tokens == announced
                    assert mm["num_image_patches"] == [len(im.plan.views)]
                    with torch.no_grad():
                        out = model([ids_of(model, text)], [[im]])
                    assert out.batch.num_visual_tokens == [announced]
                # a per-call budget is the same as the config's
                if budget is not None:
                    model.config.plan_options = dict(saved)
                    assert model.prepare_image(img, max_visual_tokens=budget).plan == model.plan(size, max_visual_tokens=budget)
                    assert model.processor().num_visual_tokens([size]) != [announced] or announced == full
        if name == "next-uhd":
            # the planner alone counts LLaVA-NeXT's projector tokens: its budget would refuse this one
            with pytest.raises(BudgetError):
                plan_image("llava-next", (1000, 700), max_visual_tokens=spec.plan((1000, 700)).num_visual_tokens)
    finally:
        model.config.plan_options = saved


def test_composed_selector_splices_within_the_announced_bound():
    model = build_model({"base": "llava-uhd", "selector": "text-guided"}, tiny=True, seed=0)
    proc = model.processor()
    img = rand_image((1000, 700), 3)
    announced = proc.num_visual_tokens([img])[0]
    n = _spliced(model, proc(text=["Look: <image>\nWhat is small?"], images=[img]))[0]
    assert 0 < n <= announced == model.prepare_image(img).plan.num_visual_tokens


def test_model_imports_no_methods_module():
    """The methods ↔ model cycle stays cut: the model module (which builds models from configs,
    :func:`hires_lmm.model.build_from_config`) needs nothing of :mod:`hires_lmm.methods`, which
    imports it."""
    import subprocess
    import sys

    code = ("import sys, hires_lmm.model as m, hires_lmm.processing, hires_lmm.visual; "
            "assert 'hires_lmm.methods' not in sys.modules, 'methods imported'; "
            "import hires_lmm.methods as s; assert s.build_from_config is m.build_from_config")
    subprocess.run([sys.executable, "-c", code], check=True)
