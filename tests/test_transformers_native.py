"""hires-lmm as transformers users expect it (issue 15): a PreTrainedModel with GenerationMixin,
Auto registration on ``import hires_lmm``, ``from_pretrained(dtype=..., device_map=...)``,
HiresProcessor (tensors, chat template on content lists, save/load), ``model.generate(**inputs)``
with streaming, and the sampler / incremental stop matcher shared with the server's engine."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GenerationMixin, PreTrainedModel, TextIteratorStreamer

from hires_lmm.errors import HiresError, ModelLoadError
from hires_lmm.generation import IncrementalDecoder, StopMatcher, sample_next, sampling_processors
from hires_lmm.methods import build_model
from hires_lmm.model import HiresLMM
from hires_lmm.plan import METHODS
from hires_lmm.processing import (
    CHAT_TEMPLATES,
    HiresImageProcessor,
    HiresProcessor,
    ProcessorInputError,
    pack_images,
    unpack_images,
)
from hires_lmm.text import build_byte_tokenizer


def rand_image(size, seed=0) -> Image.Image:
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def uhd() -> HiresLMM:
    return build_model("llava-uhd", tiny=True, seed=2)


@pytest.fixture(scope="module")
def saved(uhd, tmp_path_factory):
    d = tmp_path_factory.mktemp("saved") / "uhd"
    uhd.save_pretrained(d)
    return d


# --- 1. the model as a transformers model ---------------------------------------------------------

def test_is_a_transformers_model_with_unchanged_parameter_names(uhd):
    assert isinstance(uhd, PreTrainedModel) and isinstance(uhd, GenerationMixin) and uhd.can_generate()
    assert uhd.get_input_embeddings() is uhd.llm.get_input_embeddings()
    # the visual module is never split over devices; the LLM's decoder layers come from the LLM
    assert {"UHDVisual", "LlamaDecoderLayer"} <= set(uhd._no_split_modules)
    names = set(uhd.state_dict())
    parts = {f"llm.{k}" for k in uhd.llm.state_dict()} | {f"visual.{k}" for k in uhd.visual.state_dict()}
    assert names == parts  # PreTrainedModel added no parameter or buffer; saved directories still load
    assert uhd.generation_config.eos_token_id == uhd.tokenizer.eos_token_id


def test_from_pretrained_dtype_and_device_map(uhd, saved, tmp_path):
    ref = dict(uhd.state_dict())
    m = HiresLMM.from_pretrained(saved, dtype=torch.bfloat16, device_map="cpu")
    assert m.dtype == torch.bfloat16 and m.device.type == "cpu"
    assert all(torch.equal(v, ref[k].to(v.dtype)) for k, v in m.state_dict().items())
    # "auto": the dtype the weights are stored in; torch_dtype (older name) too
    assert HiresLMM.from_pretrained(saved, dtype="auto").dtype == torch.float32
    assert HiresLMM.from_pretrained(saved, torch_dtype="auto").dtype == torch.float32
    m.save_pretrained(tmp_path / "bf16", max_shard_size="300KB")  # sharded, stored in bfloat16
    assert len(set(json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    auto = HiresLMM.from_pretrained(tmp_path / "bf16", dtype="auto", device_map="auto")
    assert auto.dtype == torch.bfloat16 and auto.device.type == "cpu"
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in auto.state_dict().items())
    for bad, match in [({"dtype": "int8"}, "floating-point"), ({"dtype": "nonsense"}, "floating-point"),
                       ({"frobnicate": 1}, "unsupported argument"), ({"device_map": "tpu:9"}, "device_map")]:
        with pytest.raises(ModelLoadError, match=match) as e:
            HiresLMM.from_pretrained(saved, **bad)
        assert "\n" not in str(e.value)


def test_bfloat16_generates(saved):
    m = HiresLMM.from_pretrained(saved, dtype=torch.bfloat16)
    proc = m.processor()
    inputs = proc(text="<image>\nWhat?", images=rand_image((120, 90), 3))
    out = m.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)


# --- 2. registration ------------------------------------------------------------------------------

def test_import_registers_with_the_auto_classes_without_torch_until_used(saved):
    code = (
        "import sys, hires_lmm\n"
        "print('torch' in sys.modules)\n"
        "import torch\n"
        "from transformers import (AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText,"
        " AutoProcessor)\n"
        f"d = {str(saved)!r}\n"
        "print(type(AutoConfig.from_pretrained(d)).__name__)\n"
        "m = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.bfloat16, device_map='cpu')\n"
        "print(type(m).__name__, m.dtype)\n"
        "print(type(AutoModelForCausalLM.from_pretrained(d)).__name__)\n"
        "print(type(AutoProcessor.from_pretrained(d)).__name__, type(AutoImageProcessor.from_pretrained(d)).__name__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split("\n")[:5] == ["False", "HiresConfig", "HiresLMM torch.bfloat16", "HiresLMM",
                                        "HiresProcessor HiresImageProcessor"], r.stderr[-2000:]


def test_registration_when_transformers_comes_first(saved):
    code = ("import transformers.models.auto.modeling_auto as ma, hires_lmm, transformers\n"
            f"print(type(transformers.AutoModelForImageTextToText.from_pretrained({str(saved)!r})).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "HiresLMM", r.stderr[-2000:]


# --- 3. the processor -----------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_processor_tensors_give_the_list_paths_logits(method):
    model = build_model(method, tiny=True, seed=3)
    proc = model.processor()
    texts = ["<image>\nWhat is small?", "Compare <image> and <image> please."]
    imgs = [rand_image((150, 110), 1), rand_image((90, 260), 2), rand_image((300, 200), 3)]
    inputs = proc(text=texts, images=imgs)  # right padding (the tokenizer's side)
    assert inputs["pixel_values"].dim() == 5 and inputs["image_sizes"].tolist()[1] == [[260, 90], [200, 300]]
    assert (inputs["input_ids"] == model.image_token_id).sum(1).tolist() == [1, 2]
    ids = [torch.tensor(model.tokenizer(t).input_ids) for t in texts]
    prepared = [[model.prepare_image(imgs[0])], [model.prepare_image(imgs[1]), model.prepare_image(imgs[2])]]
    with torch.no_grad():
        lists = model(input_ids=ids, images=prepared)
        tensors = model(**inputs)
    assert torch.equal(tensors.logits, lists.logits)
    assert tensors.batch.num_visual_tokens == lists.batch.num_visual_tokens
    if method != "slime":  # closed form before encoding (SliME's is the bound before its selector)
        assert proc.num_visual_tokens(imgs) == lists.batch.num_visual_tokens
    else:
        assert all(n <= b for n, b in zip(lists.batch.num_visual_tokens, proc.num_visual_tokens(imgs)))


def test_training_loss_from_tensors_equals_the_list_call(uhd):
    proc = uhd.processor()
    texts = ["<image>\nA red square.", "Two: <image> <image> done"]
    imgs = [rand_image((120, 90), 1), rand_image((90, 200), 2), rand_image((64, 64), 3)]
    inputs = proc(text=texts, images=imgs)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == uhd.image_token_id, -100)
    ids = [torch.tensor(uhd.tokenizer(t).input_ids) for t in texts]
    lists = uhd(input_ids=ids, images=[[uhd.prepare_image(imgs[0])], [uhd.prepare_image(i) for i in imgs[1:]]],
                labels=[i.masked_fill(i == uhd.image_token_id, -100) for i in ids])
    tensors = uhd(**inputs, labels=labels)
    assert torch.allclose(tensors.loss, lists.loss, rtol=1e-5, atol=1e-6)
    tensors.loss.backward()  # gradients reach the visual module through the tensor path
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in uhd.visual.parameters())
    uhd.zero_grad(set_to_none=True)


def test_generate_on_processor_tensors_equals_generate_on_prompts(uhd):
    proc = uhd.processor()
    prompts = ["<image>\nRead it.", "What is <image> showing?"]
    imgs = [rand_image((400, 300), 4), rand_image((100, 220), 5)]  # different visual-token counts
    want = uhd.generate(prompts, [[imgs[0]], [imgs[1]]], max_new_tokens=10)
    for side in ("left", "right"):
        inputs = proc(text=prompts, images=imgs, padding_side=side)
        out = uhd.generate(**inputs, max_new_tokens=10, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        got = [t for t in proc.batch_decode(new, skip_special_tokens=True)]
        assert got == want, side
    # without a cache every step re-splices the whole sequence: same tokens
    inputs = proc(text=prompts[:1], images=imgs[:1])
    a = uhd.generate(**inputs, max_new_tokens=5, do_sample=False)
    b = uhd.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_generate_expands_pixels_per_sample_and_streams(uhd):
    proc = uhd.processor()
    inputs = proc(text=["<image>\nHi", "<image> there"], images=[rand_image((200, 120), 6), rand_image((64, 64), 7)])
    torch.manual_seed(0)
    out = uhd.generate(**inputs, max_new_tokens=4, do_sample=True, num_return_sequences=2)
    assert out.shape[0] == 4
    beams = uhd.generate(**inputs, max_new_tokens=4, num_beams=2)
    greedy = uhd.generate(**inputs, max_new_tokens=4)
    assert beams.shape == greedy.shape
    streamer = TextIteratorStreamer(uhd.tokenizer, skip_prompt=True, skip_special_tokens=True)
    one = proc(text="<image>\nHi", images=rand_image((200, 120), 6))
    t = threading.Thread(target=uhd.generate, kwargs={**one, "max_new_tokens": 12, "do_sample": False,
                                                      "streamer": streamer})
    t.start()
    streamed = "".join(streamer)
    t.join()
    assert streamed == uhd.generate(["<image>\nHi"], [[rand_image((200, 120), 6)]], max_new_tokens=12)[0]


def test_chat_template_takes_content_lists_and_renders_the_reference(uhd, saved):
    from hires_lmm.data.templates import get_template

    proc = HiresProcessor.from_pretrained(saved)
    tok = proc.tokenizer
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": "And now?"}]
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "And now?"}, {"from": "gpt", "value": "x"}]
    vicuna = get_template("vicuna_v1")
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text + " x" + tok.eos_token == vicuna.render(tok, conv)
    one = proc.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False)
    assert one == vicuna.prompt_text(tok, "<image>\nWhat is it?")
    # the ids given to the model are the training template's (an OpenAI image_url part is an image too)
    openai = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                           {"type": "text", "text": "What is it?"}]}]
    ids = proc(text=proc.apply_chat_template(openai, add_generation_prompt=True, tokenize=False),
               images=rand_image((50, 40)))["input_ids"][0].tolist()
    assert ids == vicuna.prompt(tok, "<image>\nWhat is it?")
    # tokenize=True: transformers loads the message's image and calls the processor
    pil = [{"role": "user", "content": [{"type": "image", "image": rand_image((50, 40))},
                                        {"type": "text", "text": "What is it?"}]}]
    enc = proc.apply_chat_template(pil, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == ids and enc["image_sizes"].tolist() == [[[40, 50]]]
    # Llama-3 and ChatML models get their reference formats
    for name, extra in (("llama3", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
                        ("chatml", ["<|im_start|>", "<|im_end|>"])):
        t = build_byte_tokenizer()
        t.add_special_tokens({"additional_special_tokens": ["<image>", *extra]})
        p = HiresProcessor(HiresImageProcessor("llava-next"), t)
        assert p.chat_template == CHAT_TEMPLATES[name]
        rendered = p.apply_chat_template(msgs + [{"role": "assistant", "content": "x"}], tokenize=False)
        assert rendered == get_template(name).render(t, conv), name
        system = [{"role": "system", "content": "Be brief."}] + msgs[:1]
        assert (p.apply_chat_template(system, add_generation_prompt=True, tokenize=False)
                == get_template(name).prompt_text(t, "<image>\nWhat is it?", "Be brief."))


def test_processor_save_load_and_directories_saved_before_it(uhd, saved, tmp_path):
    files = {p.name for p in saved.iterdir()}
    assert {"preprocessor_config.json", "processor_config.json", "generation_config.json"} <= files
    proc = HiresProcessor.from_pretrained(saved)
    assert proc.image_processor.method == "llava-uhd" and proc.chat_template == CHAT_TEMPLATES["vicuna_v1"]
    proc.image_processor.fast_decode = True
    proc.save_pretrained(tmp_path / "p")
    again = HiresProcessor.from_pretrained(tmp_path / "p")
    assert again.image_processor.fast_decode and again.chat_template == proc.chat_template
    # a model directory written before processors existed: method and plan options from config.json
    old = tmp_path / "old"
    uhd.save_pretrained(old)
    for f in ("preprocessor_config.json", "processor_config.json"):
        (old / f).unlink()
    assert HiresImageProcessor.from_pretrained(old).method == "llava-uhd"
    assert HiresLMM.from_pretrained(old).config.method == "llava-uhd"


def test_image_processor_exact_by_default_fast_as_an_option(tmp_path):
    img = rand_image((2800, 2100), 8)  # large enough for a reduced decode (>= 2x the 336 canvas)
    path = tmp_path / "a.jpg"
    img.save(path, quality=95)
    ip = HiresImageProcessor("llava-1.5")
    exact = ip(str(path))
    fast = ip(str(path), fast_decode=True)
    from hires_lmm.processing import prepare_image

    ref = prepare_image(str(path), "llava-1.5").views[0]
    assert torch.equal(exact["pixel_values"][0, 0], ref)
    assert fast["pixel_values"].shape == exact["pixel_values"].shape
    assert 0 < (fast["pixel_values"] - exact["pixel_values"]).abs().mean() < 0.05
    assert ip.num_visual_tokens((2800, 2100)) == 576
    mm = HiresProcessor(HiresImageProcessor("llava-next"), build_byte_tokenizer())._get_num_multimodal_tokens([[900, 1200]])
    assert mm.num_image_tokens == [HiresImageProcessor("llava-next").num_visual_tokens((1200, 900))]


def test_bad_inputs_are_one_line_errors(uhd):
    proc = uhd.processor()
    cases = [(lambda: proc(text="no placeholder", images=rand_image((20, 20))), "placeholder"),
             (lambda: proc(text=["<image>", "<image>"], images=[[rand_image((20, 20))]]), "2 texts but 1"),
             (lambda: proc(text=None), "needs text"),
             (lambda: HiresImageProcessor("llava-9"), "unknown method")]
    for fn, match in cases:
        with pytest.raises(ProcessorInputError, match=match) as e:
            fn()
        assert isinstance(e.value, HiresError) and "\n" not in str(e.value)
    # pixels prepared for another method are refused, naming the view
    other = HiresImageProcessor("llava-1.5")(rand_image((300, 200)))
    with pytest.raises(ProcessorInputError, match="prepared for another method") as e:
        unpack_images(other["pixel_values"], other["view_sizes"], other["image_sizes"], "llava-uhd", {}, 1)
    assert "\n" not in str(e.value)


def test_pack_unpack_round_trip_of_variable_views(uhd):
    ims = [[uhd.prepare_image(rand_image((500, 200), 9))], [], [uhd.prepare_image(rand_image((60, 400), 10))]]
    packed = pack_images(ims)
    back = unpack_images(packed["pixel_values"], packed["view_sizes"], packed["image_sizes"], "llava-uhd", {}, 3)
    assert [len(s) for s in back] == [1, 0, 1]
    for a, b in zip([x for s in ims for x in s], [x for s in back for x in s]):
        assert a.plan == b.plan and all(torch.equal(u, v) for u, v in zip(a.views, b.views))
    assert pack_images([[], []]) == {}


# --- 4. one sampler, one incremental stop matcher -------------------------------------------------

def test_sampler_is_transformers_warpers_and_draw():
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(11)
    ours = [int(sample_next(logits, 0.7, 0.8, gen)) for _ in range(20)]
    torch.manual_seed(11)  # GenerationMixin's draw: warpers, softmax, multinomial on the global generator
    scores = sampling_processors(0.7, 0.8)(None, logits)
    theirs = [int(torch.multinomial(torch.softmax(scores, -1), 1)) for _ in range(20)]
    assert ours == theirs
    assert int(sample_next(logits, 0.0)) == int(logits.argmax())
    kept = torch.isfinite(scores).sum()
    assert 1 <= kept < 300  # top_p cut the tail


def test_seeded_sampling_of_generate_is_reproducible_and_leaves_the_global_rng(uhd):
    img = [[rand_image((100, 80), 1)]]
    state = torch.get_rng_state()
    a = uhd.generate(["<image> hi"], img, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == uhd.generate(["<image> hi"], img, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)


def test_incremental_decoder_decodes_a_window_not_the_whole_text():
    tok = build_byte_tokenizer(["red", "green", "blue"])
    text = "Le café est très bon — ça coûte 3 €, red green blue! " * 6 + "日本語のテキスト"
    ids = tok(text, add_special_tokens=False).input_ids
    lengths = []
    decode = tok.decode
    tok.decode = lambda x, **k: (lengths.append(len(x)), decode(x, **k))[1]  # type: ignore[method-assign]
    try:
        d = IncrementalDecoder(tok)
        pieces = [d.push(t) for t in ids]
    finally:
        del tok.decode
    assert "".join(pieces) == d.text == tok.decode(ids) == text
    assert len(ids) > 300 and max(lengths) <= 8  # a few tokens per decode, however long the reply


def test_stop_matcher_streams_exactly_the_final_text():
    tok = build_byte_tokenizer()
    rng = np.random.default_rng(0)
    for trial in range(40):
        text = "".join(rng.choice(list("ab c\n€é日")) for _ in range(60))
        stops = [text[25:28]] if trial % 2 else ["zz", "q"]
        m = StopMatcher(tok, stops)
        streamed = ""
        for t in tok(text, add_special_tokens=False).input_ids:
            hit = m.push(t)
            if hit:
                break
            streamed += m.ready()
        final = m.finish()
        assert final.startswith(streamed)
        assert all(s not in streamed for s in stops)
        assert final == (text[:text.find(stops[0])] if trial % 2 else text)
        assert m.stopped == bool(trial % 2)


def test_save_pretrained_takes_transformers_arguments(tmp_path):
    model = build_model("llava-1.5", tiny=True)
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)  # other ranks write nothing
    assert not (tmp_path / "rank1").exists()
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert (tmp_path / "m" / "model.safetensors").is_file()
    for bad in ({"safe_serialization": False}, {"push_to_hub": True}):
        with pytest.raises(ModelLoadError) as e:
            model.save_pretrained(tmp_path / "x", **bad)
        assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
