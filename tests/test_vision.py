"""Vision encoders: ViT (CLIP/SigLIP + position interpolation), ConvNeXt, LLaVA-HR's MRA.

Tiny configurations built here; everything runs on CPU in a few seconds.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from hires_lmm.vision.convnext import ConvNeXt, ConvNeXtConfig
from hires_lmm.vision.mra import DualPathEncoder, FinalFusion, MRAdapter, resize_to_grid
from hires_lmm.vision.vit import ViT

D = 32  # tiny ViT width


def clip_config(layers: int = 4) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=D, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        image_size=336, patch_size=14,
    )


def siglip_config() -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=D, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=224, patch_size=14,
    )


def tiny_convnext_config() -> ConvNeXtConfig:
    return ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(8, 16, 24, 40))


@pytest.fixture
def vit() -> ViT:
    torch.manual_seed(0)
    return ViT.from_config(clip_config()).eval()


def randomize_(module: torch.nn.Module, std: float = 0.05) -> None:
    """Give every parameter non-trivial values (zero-init projections included)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


# ----------------------------------------------------------------------------- ViT vs HF
def test_vit_native_matches_hf_clip(vit: ViT) -> None:
    x = torch.randn(2, 3, 336, 336)
    with torch.no_grad():
        hs = vit.vision_tower(x, output_hidden_states=True).hidden_states
        for select_layer in (-2, -1, 0, 1):
            ours = vit(x, select_layer=select_layer)
            assert ours.shape == (2, 576, D)
            assert torch.equal(ours, hs[select_layer][:, 1:]), select_layer


def test_vit_native_matches_hf_clip_with_cls(vit: ViT) -> None:
    vit.drop_cls = False
    x = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        hs = vit.vision_tower(x, output_hidden_states=True).hidden_states
        assert torch.equal(vit(x), hs[-2])
        assert torch.equal(vit.embed(x), hs[0])  # embeddings + pre-LN


def test_vit_native_matches_hf_siglip() -> None:
    torch.manual_seed(0)
    v = ViT.from_config(siglip_config()).eval()
    assert not v.has_cls and v.native_grid == 16 and v.num_layers == 3
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        hs = v.vision_tower(x, output_hidden_states=True).hidden_states
        assert torch.equal(v(x), hs[-2])  # no CLS to drop, no post-LN
        # non-native grid: same interpolation as HF's interpolate_pos_encoding
        x2 = torch.randn(1, 3, 196, 252)
        hs2 = v.vision_tower(x2, output_hidden_states=True, interpolate_pos_encoding=True)
        torch.testing.assert_close(v(x2), hs2.hidden_states[-2], rtol=0, atol=1e-6)


def test_vit_properties(vit: ViT) -> None:
    assert (vit.hidden_size, vit.patch_size, vit.native_grid) == (D, 14, 24)
    assert vit.has_cls and vit.num_layers == 4 and len(vit.layers) == 4
    # HF names kept under `vision_tower.` (LLaVA's CLIPVisionTower nesting), no duplicates
    keys = list(vit.state_dict())
    assert all(k.startswith("vision_tower.") for k in keys)
    assert len(keys) == len(vit.vision_tower.state_dict())


def test_forward_runs_only_needed_layers(vit: ViT) -> None:
    calls = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o, n=n: calls.append(n))
        for n, layer in enumerate(vit.layers)
    ]
    with torch.no_grad():
        vit(torch.randn(1, 3, 336, 336))  # select_layer=-2 -> layers 0..2
    for h in hooks:
        h.remove()
    assert calls == [0, 1, 2]


def test_run_layers_composes(vit: ViT) -> None:
    x = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        e = vit.embed(x)
        whole = vit.run_layers(e, 0, 4)
        parts = vit.run_layers(vit.run_layers(e, 0, 1), 1, 4)
        hs = vit.vision_tower(x, output_hidden_states=True).hidden_states
    assert torch.equal(whole, parts) and torch.equal(whole, hs[4])
    with pytest.raises(ValueError):
        vit.run_layers(e, 2, 5)


# ----------------------------------------------------------------------------- interpolation
def keys_cubic(x: float, a: float) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of torch's plain bicubic (Keys a=-0.75, align_corners=False,
    border indices clamped), written from the definition."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5
        f = math.floor(src)
        t = src - f
        for k in range(-1, 3):
            m[i, min(max(f + k, 0), n_in - 1)] += keys_cubic(t - k, -0.75)
    return m


def bicubic_aa_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of the antialiased bicubic (PIL's filter: Keys a=-0.5, support
    widened by the scale when downsampling, weights normalised at the borders)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1 else 2.0
    inv = 1.0 / scale if scale >= 1 else 1.0
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        w = torch.tensor([keys_cubic((j - center + 0.5) * inv, -0.5) for j in range(lo, hi)])
        m[i, lo:hi] = w / w.sum()
    return m


def independent_resize(table: torch.Tensor, grid: tuple[int, int], aa: bool) -> torch.Tensor:
    """Separable resize of the (1 + 24*24, d) CLIP table to grid, CLS kept."""
    mk = bicubic_aa_matrix if aa else bicubic_matrix
    d = table.shape[1]
    patch = table[1:].double().reshape(24, 24, d)
    out = torch.einsum("hi,wj,ijd->hwd", mk(24, grid[0]), mk(24, grid[1]), patch)
    return torch.cat([table[:1].double(), out.reshape(-1, d)]).float()


def test_position_embeddings_identity_at_native(vit: ViT) -> None:
    table = vit.vision_tower.embeddings.position_embedding.weight
    assert vit.position_embeddings((24, 24)) is table
    assert vit.position_embeddings((24, 24), antialias=True) is table


@pytest.mark.parametrize("aa", [False, True])
@pytest.mark.parametrize("grid", [(23, 24), (1, 34), (32, 32), (16, 12)])
def test_position_embeddings_match_independent_bicubic(
    vit: ViT, grid: tuple[int, int], aa: bool
) -> None:
    table = vit.vision_tower.embeddings.position_embedding.weight.detach()
    ours = vit.position_embeddings(grid, antialias=aa).detach()
    assert ours.shape == (1 + grid[0] * grid[1], D)
    assert torch.equal(ours[0], table[0])  # CLS position untouched
    torch.testing.assert_close(ours, independent_resize(table, grid, aa), rtol=0, atol=1e-5)


@pytest.mark.parametrize("hw", [(322, 336), (14, 476)])
def test_non_native_sizes_match_hf_interpolate_pos_encoding(
    vit: ViT, hw: tuple[int, int]
) -> None:
    # HF's `interpolate_pos_encoding=True` calls F.interpolate(bicubic, align_corners=False) with
    # no antialias: the same call as LLaVA-UHD's resize_pos_embedding and our default, so the two
    # agree (to float rounding). LLaVA-HR's antialias=True differs (next test).
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ours = vit(x)
        hf = vit.vision_tower(x, output_hidden_states=True, interpolate_pos_encoding=True)
    assert ours.shape == (2, (hw[0] // 14) * (hw[1] // 14), D)  # 552 and 34 tokens
    torch.testing.assert_close(ours, hf.hidden_states[-2][:, 1:], rtol=0, atol=1e-6)


def test_hr_antialias_differs_from_hf_at_448(vit: ViT) -> None:
    # torch's antialiased bicubic uses PIL's a=-0.5 kernel, so even upsampling 24 -> 32 (LLaVA-HR's
    # 448 input) differs from the plain a=-0.75 bicubic of UHD / HF.
    plain = vit.position_embeddings((32, 32), antialias=False)
    aa = vit.position_embeddings((32, 32), antialias=True)
    assert (plain - aa).abs().max() > 1e-4


def test_embed_rejects_non_multiple_of_patch(vit: ViT) -> None:
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        vit(torch.randn(1, 3, 330, 336))


def test_position_embeddings_track_training(vit: ViT) -> None:
    """No stale cache: interpolated positions follow the parameter and receive gradients."""
    x = torch.randn(1, 3, 322, 336)
    before = vit(x).detach()
    vit(x).sum().backward()
    grad = vit.vision_tower.embeddings.position_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    with torch.no_grad():
        vit.vision_tower.embeddings.position_embedding.weight.add_(0.5)
    assert not torch.allclose(vit(x), before)


def test_gradient_checkpointing_same_grads(vit: ViT) -> None:
    x = torch.randn(1, 3, 322, 336)
    vit.train()
    vit(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None}
    assert "vision_tower.encoder.layers.0.mlp.fc1.weight" in ref
    vit.zero_grad(set_to_none=True)
    vit.gradient_checkpointing = True
    vit(x).square().sum().backward()
    got = {n: p.grad for n, p in vit.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n])


def test_low_precision_dtype(vit: ViT) -> None:
    v = vit.to(torch.bfloat16)
    with torch.no_grad():
        out = v(torch.randn(1, 3, 322, 336))  # float32 pixels are cast to the model dtype
    assert out.dtype == torch.bfloat16 and out.shape == (1, 552, D)
    assert torch.isfinite(out.float()).all()


# ----------------------------------------------------------------------------- encode_views
def test_encode_views_batches_per_size(vit: ViT) -> None:
    sizes = [(322, 336), (336, 336), (322, 336), (14, 476), (336, 336), (322, 336)]
    views = [torch.randn(3, h, w) for h, w in sizes]
    calls: list[tuple[int, ...]] = []
    hook = vit.vision_tower.embeddings.patch_embedding.register_forward_hook(
        lambda m, i, o: calls.append(tuple(i[0].shape))
    )
    with torch.no_grad():
        feats = vit.encode_views(views)
    hook.remove()
    assert sorted(calls) == sorted([(3, 3, 322, 336), (2, 3, 336, 336), (1, 3, 14, 476)])
    with torch.no_grad():
        for v, f, (h, w) in zip(views, feats, sizes):
            assert f.shape == ((h // 14) * (w // 14), D)
            torch.testing.assert_close(f, vit(v[None])[0], rtol=0, atol=1e-5)


UHD_LIKE_SIZES = [(322, 336), (336, 336), (322, 336), (14, 476), (336, 322), (252, 448), (476, 238), (336, 336)]


@pytest.mark.parametrize("drop_cls", [True, False])
@pytest.mark.parametrize("max_tokens", [None, 600, 10_000])
def test_encode_views_packed_matches_per_view(vit: ViT, drop_cls: bool, max_tokens: int | None) -> None:
    """Packed encoding (one token sequence, block-diagonal attention, chunked) = one call per view."""
    randomize_(vit)
    vit.drop_cls = drop_cls
    vit.pack_max_tokens = max_tokens
    views = [torch.randn(3, h, w) for h, w in UHD_LIKE_SIZES]
    assert vit.packable()
    with torch.no_grad():
        packed = vit.encode_views(views, packed=True)
        default = vit.encode_views(views)  # several sizes: packs
        for v, f, g, (h, w) in zip(views, packed, default, UHD_LIKE_SIZES):
            assert f.shape == ((h // 14) * (w // 14) + (0 if drop_cls else 1), D)
            torch.testing.assert_close(f, vit(v[None])[0], rtol=0, atol=1e-5)
            assert torch.equal(f, g)
        for select_layer in (0, 1, -1):
            for v, f in zip(views, vit.encode_views(views, select_layer=select_layer, packed=True)):
                torch.testing.assert_close(f, vit(v[None], select_layer=select_layer)[0], rtol=0, atol=1e-5)


def test_encode_views_packed_siglip() -> None:
    torch.manual_seed(0)
    v = ViT.from_config(siglip_config()).eval()
    views = [torch.randn(3, h, w) for h, w in [(224, 224), (196, 252), (140, 350), (196, 252)]]
    with torch.no_grad():
        for x, f in zip(views, v.encode_views(views, packed=True)):
            torch.testing.assert_close(f, v(x[None])[0], rtol=0, atol=1e-5)


def test_encode_views_packed_same_grads(vit: ViT) -> None:
    randomize_(vit)
    vit.train()
    views = [torch.randn(3, h, w) for h, w in UHD_LIKE_SIZES[:5]]
    grads = []
    for packed, ckpt in ((False, False), (True, False), (True, True)):
        vit.zero_grad(set_to_none=True)
        vit.gradient_checkpointing = ckpt
        vit.pack_max_tokens = 700 if ckpt else None
        sum(f.square().sum() for f in vit.encode_views(views, packed=packed)).backward()
        grads.append({n: q.grad.clone() for n, q in vit.named_parameters() if q.grad is not None})
    for g in grads[1:]:
        assert g.keys() == grads[0].keys()
        for n in g:
            torch.testing.assert_close(g[n], grads[0][n], rtol=1e-3, atol=1e-4)


def test_encode_views_packed_falls_back_with_hooks(vit: ViT) -> None:
    views = [torch.randn(3, h, w) for h, w in UHD_LIKE_SIZES[:4]]
    calls: list[tuple[int, ...]] = []
    hook = vit.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    try:
        assert not vit.packable()
        with torch.no_grad():
            vit.encode_views(views)  # a hook on forward sees the grouped calls
        with pytest.raises(ValueError, match="cannot be packed"):
            vit.encode_views(views, packed=True)
    finally:
        hook.remove()
    assert sorted(c[0] for c in calls) == [1, 1, 2]
    assert vit.packable() and vit.encode_views([]) == []


def test_encode_views_packs_after_a_transformers_hidden_states_call() -> None:
    """transformers 5 leaves its output-capturing hooks on every layer after the first call with
    output_hidden_states=True; they are inert and must not turn packing off."""
    torch.manual_seed(0)
    v = ViT.from_config(clip_config()).eval()
    randomize_(v)
    views = [torch.randn(3, h, w) for h, w in UHD_LIKE_SIZES[:4]]
    with torch.no_grad():
        hf = v.vision_tower(pixel_values=views[0][None], output_hidden_states=True,
                            interpolate_pos_encoding=True).hidden_states
        assert len(hf) == v.num_layers + 1
        assert any(len(layer._forward_hooks) for layer in v.layers)  # what transformers left behind
        assert v.packable()
        for x, f in zip(views, v.encode_views(views, packed=True)):
            torch.testing.assert_close(f, v(x[None])[0], rtol=0, atol=1e-5)
        hook = v.layers[0].register_forward_hook(lambda m, i, o: None)  # a user's hook still counts
        try:
            assert not v.packable()
        finally:
            hook.remove()


# ----------------------------------------------------------------------------- loading
def test_from_pretrained_vision_dir(tmp_path, vit: ViT) -> None:
    vit.vision_tower.save_pretrained(tmp_path / "clip")
    loaded = ViT.from_pretrained(tmp_path / "clip").eval()
    x = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        assert torch.equal(loaded(x), vit(x))
    assert ViT.from_pretrained(tmp_path / "clip", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_from_pretrained_full_clip_dir(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = CLIPConfig(
        vision_config=clip_config(2).to_dict(),
        text_config=dict(hidden_size=D, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4),
        projection_dim=16,
    )
    full = CLIPModel(cfg).eval()
    full.save_pretrained(tmp_path / "full")
    v = ViT.from_pretrained(tmp_path / "full").eval()
    assert v.num_layers == 2 and v.hidden_size == D
    x = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        ref = full.vision_model(x, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert torch.equal(v(x), ref)


def test_from_pretrained_siglip_dir(tmp_path) -> None:
    SiglipVisionModel(siglip_config()).save_pretrained(tmp_path / "sig")
    v = ViT.from_pretrained(tmp_path / "sig")
    assert not v.has_cls and v(torch.randn(1, 3, 224, 224)).shape == (1, 256, D)


def test_from_pretrained_errors(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        ViT.from_pretrained(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        ViT.from_pretrained(tmp_path / "empty")
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="llm.*llama"):
        ViT.from_pretrained(tmp_path / "llm")


def test_from_config_dict_and_type_check() -> None:
    v = ViT.from_config(clip_config(2).to_dict())
    assert v.num_layers == 2 and v.has_cls
    s = ViT.from_config({"model_type": "siglip_vision_model", **siglip_config().to_dict()})
    assert not s.has_cls
    with pytest.raises(TypeError):
        ViT(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- ConvNeXt
def test_convnext_stage_shapes_and_names() -> None:
    cn = ConvNeXt(tiny_convnext_config())
    outs = cn(torch.randn(2, 3, 128, 96))
    assert [tuple(o.shape) for o in outs] == [
        (2, 8, 32, 24), (2, 16, 16, 12), (2, 24, 8, 6), (2, 40, 4, 3)
    ]
    # stage by stage = forward
    x = cn.forward_stem(torch.zeros(1, 3, 64, 64))
    assert x.shape == (1, 8, 16, 16)
    keys = set(cn.state_dict())
    for k in ["stem.0.weight", "stem.1.bias", "stages.1.downsample.0.weight",
              "stages.1.downsample.1.weight", "stages.0.blocks.0.conv_dw.weight",
              "stages.0.blocks.0.norm.weight", "stages.2.blocks.1.mlp.fc1.weight",
              "stages.3.blocks.0.mlp.fc2.bias", "stages.0.blocks.0.gamma"]:
        assert k in keys, k
    assert not any(k.startswith("stages.0.downsample") for k in keys)  # timm: Identity


def test_convnext_presets() -> None:
    large = ConvNeXtConfig.convnext_large()
    assert large.depths == (3, 3, 27, 3) and large.dims == (192, 384, 768, 1536)
    tiny = ConvNeXtConfig.convnext_tiny()
    assert tiny.depths == (3, 3, 9, 3) and tiny.dims == (96, 192, 384, 768)
    with torch.device("meta"):
        m = ConvNeXt(large)
    assert m.hidden_size == 1536 and m.stride == 32
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(196.2e6, rel=0.01)


def test_convnext_save_load_roundtrip(tmp_path) -> None:
    torch.manual_seed(0)
    cn = ConvNeXt(tiny_convnext_config()).eval()
    randomize_(cn)
    cn.save_pretrained(tmp_path / "cn")
    loaded = ConvNeXt.from_pretrained(tmp_path / "cn").eval()
    assert loaded.config == cn.config
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(cn(x), loaded(x)):
            assert torch.equal(a, b)


def test_convnext_refuses_extra_or_missing_keys(tmp_path) -> None:
    cn = ConvNeXt(tiny_convnext_config())
    sd = cn.state_dict()
    extra = dict(sd, **{"stages.0.blocks.0.bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"stages\.0\.blocks\.0\.bogus"):
        cn.load_state_dict(extra)
    missing = {k: v for k, v in sd.items() if k != "stages.2.blocks.1.mlp.fc1.weight"}
    with pytest.raises(ValueError, match=r"stages\.2\.blocks\.1\.mlp\.fc1\.weight"):
        cn.load_state_dict(missing)
    # and through from_pretrained, from a .bin
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cn.config.to_dict()))
    torch.save(extra, tmp_path / "bad" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="bogus"):
        ConvNeXt.from_pretrained(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ConvNeXt.from_pretrained(tmp_path / "nowhere")


def test_convnext_loads_open_clip_and_llava_hr_names(tmp_path) -> None:
    torch.manual_seed(0)
    cn = ConvNeXt(tiny_convnext_config()).eval()
    randomize_(cn)
    # open_clip layout: visual.trunk.* (+ head, text tower);
    # LLaVA-HR's vendored timm: layer scale named "weight"
    oc = {"visual.trunk." + k.replace(".gamma", ".weight"): v for k, v in cn.state_dict().items()}
    oc["visual.trunk.head.norm.weight"] = torch.ones(40)
    oc["visual.head.mlp.fc1.weight"] = torch.zeros(4, 40)
    oc["text.token_embedding.weight"] = torch.zeros(5, 4)
    torch.save(oc, tmp_path / "open_clip_pytorch_model.bin")
    loaded = ConvNeXt.from_pretrained(tmp_path / "open_clip_pytorch_model.bin",
                                      config=tiny_convnext_config()).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(cn.forward_features(x), loaded.forward_features(x))


# ----------------------------------------------------------------------------- MRA
def make_dual(layers: int = 4, adapters: bool = True, gate: str = "scalar") -> DualPathEncoder:
    torch.manual_seed(0)
    vit = ViT.from_config(clip_config(layers))
    cn = ConvNeXt(tiny_convnext_config())
    return DualPathEncoder(vit, cn, adapters=adapters, gate=gate).eval()  # type: ignore[arg-type]


def without_adapters(d: DualPathEncoder, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The ViT blocks alone + final fusion (LLaVA-HR's stage-1 path)."""
    y = d.vit.embed(lo, drop_cls=True, antialias=True)
    y = d.vit.run_layers(y, 0, d.vit.num_layers)
    return d.fusion(y, d.convnext.forward_features(hi))


def test_reference_parameter_names() -> None:
    d = make_dual()
    keys = set(d.state_dict())
    assert "align_stages_latent.2.gate.2.weight" in keys
    assert "align_stages.0.slow_proj.weight" in keys
    assert "slow_vision_tower.stages.3.blocks.0.gamma" in keys
    assert any(k.startswith("fast_vision_tower.vision_tower.encoder.layers.3.") for k in keys)
    a = d.align_stages_latent[0]
    names = {n for n, _ in a.named_children()}
    assert names == {"slow_conv", "slow_proj", "fast_conv", "fast_proj", "gate"}
    assert a.fast_conv.groups == D and a.fast_conv.kernel_size == (7, 7)
    assert a.slow_proj.weight.abs().sum() == 0 and a.fast_proj.weight.abs().sum() == 0


@pytest.mark.parametrize("gate", ["scalar", "channel"])
def test_adapters_identity_at_init_then_not_after_a_step(gate: str) -> None:
    d = make_dual(gate=gate)
    # small geometry: ConvNeXt 6x6 map upsampled to a 12x12 ViT grid
    hi, lo = torch.randn(2, 3, 192, 192), torch.randn(2, 3, 168, 168)
    with torch.no_grad():
        out = d(hi, lo)
        torch.testing.assert_close(out, without_adapters(d, hi, lo), rtol=0, atol=1e-6)
    d.train()
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    (d(hi, lo) * torch.randn(2, 144, D)).sum().backward()
    opt.step()
    d.eval()
    with torch.no_grad():
        gap = (d(hi, lo) - without_adapters(d, hi, lo)).abs().max()
    assert gap > 1e-3


def test_channel_gate_shape() -> None:
    a = MRAdapter(D, 40, gate="channel")
    assert a.gate[-1].out_features == D
    randomize_(a)
    out = a(torch.randn(2, 64, D), torch.randn(2, 40, 4, 4))
    assert out.shape == (2, 64, D)


def test_s1024_geometry_tiny_widths() -> None:
    d = make_dual()
    hi = torch.randn(1, 3, 1024, 1024)
    lo = d.make_lowres(hi)
    assert lo.shape[-1] == 448  # max(int(1024/32*14), 336)
    torch.testing.assert_close(
        lo, F.interpolate(hi, size=(448, 448), mode="bilinear", align_corners=True)
    )
    with torch.no_grad():
        assert d.convnext.forward_features(hi).shape == (1, 40, 32, 32)
        assert d(hi).shape == (1, 32 * 32, D)  # lowres=None: the resize above


def test_s384_geometry_upsamples_convnext() -> None:
    d = make_dual(adapters=False)
    hi = torch.randn(1, 3, 384, 384)
    assert d.lowres_side(384) == 336
    fmap = d.convnext.forward_features(hi)
    assert fmap.shape == (1, 40, 12, 12)
    with torch.no_grad():
        out = d(hi)
        assert out.shape == (1, 576, D)
        # fusion = fast_proj(vit) + slow_proj(bilinear align_corners=True 12 -> 24)
        y = d.vit.run_layers(d.vit.embed(d.make_lowres(hi), drop_cls=True), 0, 4)
        up = F.interpolate(fmap, size=(24, 24), mode="bilinear", align_corners=True)
        ref = d.fusion.fast_proj(y) + d.fusion.slow_proj(up.flatten(2).transpose(1, 2))
        torch.testing.assert_close(out, ref)


def test_final_fusion_shape_and_pooling() -> None:
    ff = FinalFusion(D, 40)
    assert ff(torch.randn(2, 24 * 24, D), torch.randn(2, 40, 12, 12)).shape == (2, 576, D)
    assert ff(torch.randn(2, 16 * 16, D), torch.randn(2, 40, 32, 32)).shape == (2, 256, D)
    m = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(resize_to_grid(m, (16, 16)), F.avg_pool2d(m, 2, 2))
    assert resize_to_grid(m, (32, 32)) is m
    with pytest.raises(ValueError):
        resize_to_grid(m, (24, 24))


def test_dual_needs_four_equal_stages() -> None:
    with pytest.raises(ValueError, match="4 stages"):
        DualPathEncoder(ViT.from_config(clip_config(3)), ConvNeXt(tiny_convnext_config()))


def test_convert_reference_state_dict() -> None:
    d = make_dual()
    randomize_(d)
    # a LLaVA-HR MultiPathCLIPVisionTower checkpoint as released (transformers 4.x names)
    ref = {}
    for k, v in d.state_dict().items():
        if k.startswith("slow_vision_tower."):
            rest = k[len("slow_vision_tower.") :].replace(".gamma", ".weight")
            k = "slow_vision_tower.vision_tower." + rest
        elif k.startswith("fast_vision_tower.vision_tower.") and not hasattr(
            d.vit.vision_tower, "vision_model"
        ):
            rest = k[len("fast_vision_tower.vision_tower.") :]
            k = "fast_vision_tower.vision_tower.vision_model." + rest
        ref["model.vision_tower." + k] = v.clone()
    ref["model.vision_tower.slow_vision_tower.vision_tower.head.fc.weight"] = torch.zeros(3, 40)
    fresh = make_dual()
    fresh.load_state_dict(fresh.convert_reference_state_dict(ref, "model.vision_tower."))
    hi = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        assert torch.equal(fresh(hi), d(hi))
