"""A ViT feature extractor over Hugging Face CLIP / SigLIP vision models.

`ViT` wraps a transformers `CLIPVisionModel` or `SiglipVisionModel` (held as ``self.vision_tower``,
so the state-dict names are HF's own under ``vision_tower.`` - the same nesting as LLaVA's
``CLIPVisionTower.vision_tower``) and adds what the high-resolution methods need:

* position embeddings interpolated to any (H/p, W/p) patch grid (LLaVA-UHD's variable-sized
  slices, LLaVA-HR's 448x448 low-resolution pathway);
* layer-by-layer execution (`run_layers`), so LLaVA-HR can interleave its MR-adapters;
* LLaVA's feature selection: hidden state of layer ``select_layer`` (-2), CLS dropped, no post-LN;
* batched encoding of many variable-sized views (`encode_views`): packed into one token
  sequence with block-diagonal attention, or one call per distinct size.

Position-embedding interpolation, as the references do it
---------------------------------------------------------
The learned native grid (24x24 for CLIP-L/14-336) is reshaped to 2-D and resized with
``F.interpolate(mode="bicubic", align_corners=False)``; the CLS position is kept as is; at the
native grid the learned table is used unchanged (exact identity). The two references differ in
one setting:

* LLaVA-UHD (``adapt_clip_vision_model.py``, ``resize_pos_embedding``): bicubic,
  ``align_corners=False``, **no antialias** (torch defaults). HF's own
  ``interpolate_pos_encoding=True`` path uses exactly the same call, so it agrees with UHD.
* LLaVA-HR (``clip_encoder.py``, ``resample_pos_embed``): bicubic, ``align_corners=False``,
  **antialias=True**, computed in float32. Torch's antialiased bicubic is PIL's filter (Keys
  a=-0.5, normalised weights at the borders) rather than the a=-0.75 convolution of the plain
  mode, so it differs even when upsampling (24 -> 32 for the 448 input).

``ViT(antialias=False)`` (the default) follows UHD/HF; `hires_lmm.vision.mra.DualPathEncoder`
passes ``antialias=True`` to follow LLaVA-HR. The resize is always computed in float32 and cast
back (as LLaVA-HR; UHD resizes in the model dtype, which only changes rounding in half precision).

No cache of interpolated tables is kept: recomputing a 24x24 bicubic resize is negligible next to
the encoder, and a cache would go stale when the position embeddings are trained.
"""

from __future__ import annotations

import inspect
import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ViT", "interpolate_pos_embed"]

_CLIP_TYPES = {"clip", "clip_vision_model"}
_SIGLIP_TYPES = {"siglip", "siglip_vision_model"}
#: encoder blocks whose pre-LN structure `ViT._packed_block` reproduces
_PACKABLE_LAYERS = {"CLIPEncoderLayer", "SiglipEncoderLayer"}
#: packed encoding on a CPU runs chunks whose MLP activations hold at most this many elements
#: (8 MiB in float32: 2048 tokens of a 1024-wide MLP), see `ViT.pack_max_tokens`
_CPU_PACK_ELEMENTS = 2 ** 21


def interpolate_pos_embed(
    pos: torch.Tensor,
    native_grid: int,
    grid: tuple[int, int],
    num_prefix: int,
    antialias: bool = False,
) -> torch.Tensor:
    """Resize a learned square position-embedding table to a (h, w) patch grid.

    Args:
        pos: (N, d) table, ``num_prefix`` prefix rows (CLIP's CLS) then native_grid² patch rows
            in row-major order.
        native_grid: side of the learned patch grid (image_size // patch_size).
        grid: target (h, w) in patches.
        num_prefix: 1 for CLIP (CLS position kept as is), 0 for SigLIP.
        antialias: False = LLaVA-UHD / HF; True = LLaVA-HR's ``resample_pos_embed``.

    Returns:
        (num_prefix + h*w, d) table in ``pos.dtype``; ``pos`` itself at the native grid.
    """
    h, w = grid
    if (h, w) == (native_grid, native_grid):
        return pos  # exact identity, as both references (they skip the resize)
    d = pos.shape[-1]
    prefix, patch = pos[:num_prefix], pos[num_prefix:]
    patch = patch.reshape(1, native_grid, native_grid, d).permute(0, 3, 1, 2)
    # float32: bicubic kernels are not implemented for half on every device, and LLaVA-HR does so.
    patch = F.interpolate(
        patch.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=antialias
    ).to(pos.dtype)
    patch = patch.permute(0, 2, 3, 1).reshape(h * w, d)
    return torch.cat([prefix, patch], dim=0)


def _read_model_type(path: str) -> str:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"no config.json in {path!r}: not a Hugging Face model directory")
    with open(cfg_file, encoding="utf-8") as f:
        return str(json.load(f).get("model_type", ""))


def _has_user_hooks(module: nn.Module) -> bool:
    """Forward (pre-)hooks on ``module`` other than transformers' output-capturing ones, which do
    nothing unless transformers itself is collecting outputs inside its own forward."""
    hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
    return any(getattr(h, "__name__", "") != "output_capturing_hook" for h in hooks)


class ViT(nn.Module):
    """CLIP / SigLIP ViT returning LLaVA-style patch features at any input size.

    Args:
        model: a transformers ``CLIPVisionModel`` or ``SiglipVisionModel``.
        select_layer: HF ``hidden_states`` index of the features (-2: output of the
            second-to-last layer; 0: the embeddings after CLIP's pre-LN).
        drop_cls: drop the CLS token from `forward`'s output (CLIP only; SigLIP has none).
        antialias: position-embedding resize setting (False: LLaVA-UHD/HF; True: LLaVA-HR).
    """

    def __init__(
        self,
        model: nn.Module,
        select_layer: int = -2,
        drop_cls: bool = True,
        antialias: bool = False,
    ) -> None:
        super().__init__()
        mtype = getattr(getattr(model, "config", None), "model_type", None)
        if mtype not in _CLIP_TYPES | _SIGLIP_TYPES:
            raise TypeError(
                f"ViT wraps a CLIPVisionModel or SiglipVisionModel, got {type(model).__name__}"
            )
        self.vision_tower = model
        self.select_layer = select_layer
        self.drop_cls = drop_cls
        self.antialias = antialias
        self.gradient_checkpointing = False
        #: packed encoding (`encode_views`) runs chunks of at most this many tokens through the
        #: blocks at a time; None: on a CPU as many as keep the MLP's activations cache-sized
        #: (2048 tokens for a 1024-wide MLP), everything at once elsewhere
        self.pack_max_tokens: int | None = None
        # 4.x CLIP layers take (x, attention_mask, causal_attention_mask) and return tuples.
        params = inspect.signature(self.layers[0].forward).parameters if len(self.layers) else {}
        self._needs_causal_mask = "causal_attention_mask" in params
        self.select_layer_index(select_layer)  # validate early

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], dtype: torch.dtype | None = None, **kw: Any
    ) -> ViT:
        """Load from a LOCAL Hugging Face directory (never the Hub).

        Accepts a vision-only dir (``clip_vision_model`` / ``siglip_vision_model``) or a full
        CLIPModel / SiglipModel dir, whose vision part is taken (as LLaVA loads
        openai/clip-vit-large-patch14-336). ``dtype`` casts after loading; ``kw`` go to `ViT`.
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"vision model directory not found: {path!r}")
        mtype = _read_model_type(path)
        from transformers import CLIPVisionModel, SiglipVisionModel
        from transformers.utils import logging as hf_logging

        if mtype in _CLIP_TYPES:
            model_cls: Any = CLIPVisionModel
        elif mtype in _SIGLIP_TYPES:
            model_cls = SiglipVisionModel
        else:
            raise ValueError(
                f"{path!r} holds model_type {mtype!r}, not a CLIP or SigLIP (vision) model"
            )
        verbosity = hf_logging.get_verbosity()
        if mtype in ("clip", "siglip"):
            hf_logging.set_verbosity_error()  # the text tower's keys are expected to be unused
        try:
            model, info = model_cls.from_pretrained(
                path, local_files_only=True, output_loading_info=True
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        if info.get("missing_keys"):
            raise ValueError(
                f"{path!r}: vision weights missing from the checkpoint: "
                f"{sorted(info['missing_keys'])[:20]}"
            )
        if dtype is not None:
            model = model.to(dtype)
        return cls(model, **kw)

    @classmethod
    def from_config(cls, config: Any, **kw: Any) -> ViT:
        """Randomly initialised ViT from a CLIP/SigLIP (vision) config or its dict.

        A dict without ``model_type`` is read as a ``CLIPVisionConfig``; a full CLIPConfig /
        SiglipConfig gives its ``vision_config``.
        """
        from transformers import (
            CLIPVisionConfig,
            CLIPVisionModel,
            SiglipVisionConfig,
            SiglipVisionModel,
        )

        if isinstance(config, Mapping):
            d = dict(config)
            mtype = d.pop("model_type", "clip_vision_model")
            if mtype in ("clip", "siglip"):
                d = dict(d["vision_config"])
                d.pop("model_type", None)
            if mtype in _CLIP_TYPES:
                config = CLIPVisionConfig(**d)
            elif mtype in _SIGLIP_TYPES:
                config = SiglipVisionConfig(**d)
            else:
                raise ValueError(f"unsupported vision model_type {mtype!r}")
        if getattr(config, "model_type", None) in ("clip", "siglip"):
            config = config.vision_config
        if isinstance(config, CLIPVisionConfig):
            model: nn.Module = CLIPVisionModel(config)
        elif isinstance(config, SiglipVisionConfig):
            model = SiglipVisionModel(config)
        else:
            raise TypeError(f"expected a CLIP/SigLIP vision config, got {type(config).__name__}")
        return cls(model, **kw)

    # ------------------------------------------------------------------ properties
    @property
    def _core(self) -> Any:  # an HF CLIP/SigLIP transformer: its submodules are looked up by name
        # transformers 4.x nests the transformer under `.vision_model`; 5.x puts it on the model.
        # (A property, not an attribute: assigning a Module would register it twice.)
        return getattr(self.vision_tower, "vision_model", self.vision_tower)

    @property
    def config(self) -> Any:
        return self.vision_tower.config

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def patch_size(self) -> int:
        return int(self.config.patch_size)

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def native_grid(self) -> int:
        """Side of the learned position grid in patches (24 for CLIP-L/14-336)."""
        return self.image_size // self.patch_size

    @property
    def has_cls(self) -> bool:
        return self.config.model_type in _CLIP_TYPES

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder blocks (HF ``encoder.layers``)."""
        return self._core.encoder.layers

    @property
    def dtype(self) -> torch.dtype:
        return self._core.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self._core.embeddings.patch_embedding.weight.device

    def select_layer_index(self, select_layer: int | None = None) -> int:
        """Number of blocks to run for HF ``hidden_states[select_layer]`` (-2 -> L-1)."""
        k = self.select_layer if select_layer is None else select_layer
        n = self.num_layers
        idx = k + n + 1 if k < 0 else k
        if not 0 <= idx <= n:
            raise ValueError(f"select_layer {k} out of range for {n} layers")
        return idx

    # ------------------------------------------------------------------ computation
    def position_embeddings(
        self, grid: tuple[int, int], antialias: bool | None = None
    ) -> torch.Tensor:
        """(P + h*w, d) position table for a (h, w) patch grid (P = 1 with CLS, else 0)."""
        aa = self.antialias if antialias is None else antialias
        table = self._core.embeddings.position_embedding.weight
        return interpolate_pos_embed(table, self.native_grid, grid, int(self.has_cls), aa)

    def embed(
        self,
        pixel_values: torch.Tensor,
        drop_cls: bool = False,
        antialias: bool | None = None,
    ) -> torch.Tensor:
        """Patch + (interpolated) position embeddings, then CLIP's pre-LayerNorm.

        Args:
            pixel_values: (B, 3, H, W), H and W multiples of the patch size.
            drop_cls: drop CLS before the pre-LN (LLaVA-HR drops it right after the embeddings,
                so it never enters the blocks). The LN is per token, so order does not matter.
            antialias: override the instance's interpolation setting.

        Returns:
            (B, T, d): T = 1 + h*w for CLIP (h*w with ``drop_cls`` or for SigLIP),
            h = H/p, w = W/p.
        """
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
        H, W = pixel_values.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} (HxW) is not a multiple of the patch size {p}")
        emb = self._core.embeddings
        x = emb.patch_embedding(pixel_values.to(dtype=self.dtype))  # (B, d, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, d)
        if self.has_cls:
            cls_tok = emb.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls_tok, x], dim=1)
        x = x + self.position_embeddings((H // p, W // p), antialias).to(x.dtype)
        if drop_cls and self.has_cls:
            x = x[:, 1:]
        pre_ln = getattr(self._core, "pre_layrnorm", None)  # CLIP only; SigLIP has no pre-LN
        return pre_ln(x) if pre_ln is not None else x

    def _call_layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = layer(x, None, None) if self._needs_causal_mask else layer(x, None)
        return out[0] if isinstance(out, tuple) else out

    def run_layers(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Run encoder blocks [start, end) on tokens x: (B, T, d) -> (B, T, d)."""
        n = self.num_layers
        if not 0 <= start <= end <= n:
            raise ValueError(f"layer range [{start}, {end}) out of range for {n} layers")
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers[start:end]:
            if ckpt:
                x = checkpoint(self._call_layer, layer, x, use_reentrant=False)
            else:
                x = self._call_layer(layer, x)
        return x

    def forward(self, pixel_values: torch.Tensor, select_layer: int | None = None) -> torch.Tensor:
        """LLaVA features: (B, 3, H, W) -> (B, h*w, d) (B, 1+h*w, d when CLS is kept).

        HF ``hidden_states[select_layer]`` (only the blocks needed are run), CLS dropped when
        ``drop_cls``, no post-LN.
        """
        n_run = self.select_layer_index(select_layer)
        x = self.run_layers(self.embed(pixel_values), 0, n_run)
        if self.drop_cls and self.has_cls:
            x = x[:, 1:]
        return x

    def encode_views(
        self,
        views: Sequence[torch.Tensor],
        select_layer: int | None = None,
        packed: bool | None = None,
    ) -> list[torch.Tensor]:
        """Encode variable-sized views in few large encoder calls.

        Two strategies, giving the same features as one call per view (float tolerance):

        * **grouped**: one batched forward per distinct view size;
        * **packed**: the embeddings (one call per distinct size: the position table depends on
          it) are concatenated into one ``(N, d)`` token sequence, ordered by sequence length;
          every block then runs its LayerNorms, projections and MLP as single matmuls over all N
          tokens (on a CPU, over cache-sized chunks of whole views: `pack_max_tokens`), and
          attention as one ``scaled_dot_product_attention`` per distinct sequence length
          (block-diagonal: a view only attends to its own tokens). LLaVA-UHD's slices come in
          many sizes, so grouping by size alone leaves many small calls.

        Args:
            views: tensors (3, h_i, w_i).
            select_layer: as in :meth:`forward`.
            packed: None (default) packs when the views have more than one size and the blocks
                are standard pre-LN CLIP/SigLIP blocks; True forces packing (ValueError when the
                blocks cannot be packed); False always groups by size.
        Returns:
            features (h_i/p * w_i/p, d) in input order (one more row, CLS, when not
            ``drop_cls``).
        """
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, v in enumerate(views):
            if v.ndim != 3:
                raise ValueError(f"view {i} must be (3, h, w), got {tuple(v.shape)}")
            groups[(int(v.shape[1]), int(v.shape[2]))].append(i)
        n_run = self.select_layer_index(select_layer)
        if packed is None:
            packed = len(groups) > 1 and self.packable(n_run)
        elif packed and not self.packable(n_run):
            raise ValueError("these encoder blocks cannot be packed (not standard CLIP/SigLIP blocks, "
                             "or hooks are registered on them)")
        if packed and views:
            return self._encode_packed(views, groups, n_run)
        out: list[torch.Tensor | None] = [None] * len(views)
        for idxs in groups.values():
            feats = self(torch.stack([views[i] for i in idxs]), select_layer)
            for i, f in zip(idxs, feats.unbind(0)):
                out[i] = f
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ packed encoding
    def packable(self, n_run: int | None = None) -> bool:
        """Whether the first ``n_run`` blocks (default: those `forward` runs) can run packed:
        transformers' own CLIP/SigLIP encoder layers, with no hooks that expect (B, T, d) blocks
        or calls of `forward` (a hook on this module sees every batched call of the grouped path).
        transformers' own output-capturing hooks (installed for good by the first call with
        ``output_hidden_states=True``, inactive outside such a call) do not count."""
        n_run = self.select_layer_index() if n_run is None else n_run
        if _has_user_hooks(self):
            return False
        for layer in self.layers[:n_run]:
            if type(layer).__name__ not in _PACKABLE_LAYERS or _has_user_hooks(layer):
                return False
            attn = getattr(layer, "self_attn", None)
            if attn is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj")):
                return False
            if _has_user_hooks(attn):
                return False
        return True

    def _encode_packed(
        self, views: Sequence[torch.Tensor], groups: Mapping[tuple[int, int], list[int]], n_run: int
    ) -> list[torch.Tensor]:
        emb: list[torch.Tensor | None] = [None] * len(views)
        for idxs in groups.values():  # one embedding call per size: the position table differs
            for i, e in zip(idxs, self.embed(torch.stack([views[i] for i in idxs])).unbind(0)):
                emb[i] = e
        # order by sequence length, so that each length's views are contiguous, and cut into
        # chunks of (length, number of views) segments. On a CPU, cache-sized chunks keep the
        # memory-bound elementwise work (GELU, LayerNorm, residuals) fast; elsewhere everything is
        # one chunk.
        order = sorted(range(len(views)), key=lambda i: emb[i].shape[0])  # type: ignore[union-attr]
        limit = self.pack_max_tokens
        if limit is None and views[0].device.type == "cpu":
            limit = max(1, _CPU_PACK_ELEMENTS // int(getattr(self.config, "intermediate_size", 4 * self.hidden_size)))
        chunks: list[list[tuple[int, int]]] = [[]]
        used = 0
        for i in order:
            t = emb[i].shape[0]  # type: ignore[union-attr]
            if limit is not None and used and used + t > limit:
                chunks.append([])
                used = 0
            seg = chunks[-1]
            if seg and seg[-1][0] == t:
                seg[-1] = (t, seg[-1][1] + 1)
            else:
                seg.append((t, 1))
            used += t
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        skip = 1 if self.drop_cls and self.has_cls else 0
        out: list[torch.Tensor | None] = [None] * len(views)
        k = 0
        for chunk in chunks:
            n_views = sum(c for _, c in chunk)
            x = torch.cat([emb[i] for i in order[k:k + n_views]])  # type: ignore[misc]
            for layer in self.layers[:n_run]:
                if ckpt:
                    x = checkpoint(self._packed_block, layer, x, chunk, use_reentrant=False)
                else:
                    x = self._packed_block(layer, x, chunk)
            start = 0
            for t, count in chunk:
                for _ in range(count):
                    out[order[k]] = x[start + skip:start + t]
                    start += t
                    k += 1
        return out  # type: ignore[return-value]

    def _packed_block(self, layer: Any, x: torch.Tensor, segments: Sequence[tuple[int, int]]) -> torch.Tensor:
        """One pre-LN block (CLIP/SigLIP ``EncoderLayer``) on packed tokens ``x`` (N, d):
        attention within each view only, everything else over all N tokens at once.

        ``layer`` is typed Any: an HF encoder layer whose submodules are looked up by name."""
        attn = layer.self_attn
        heads = int(attn.num_heads)
        hd = x.shape[-1] // heads
        h = layer.layer_norm1(x)
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        p = float(attn.dropout) if self.training else 0.0
        parts: list[torch.Tensor] = []
        start = 0
        for t, b in segments:
            n = t * b
            qs, ks, vs = (z[start:start + n].view(b, t, heads, hd).transpose(1, 2) for z in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=p, scale=attn.scale)
            parts.append(o.transpose(1, 2).reshape(n, heads * hd))
            start += n
        x = x + attn.out_proj(parts[0] if len(parts) == 1 else torch.cat(parts))
        return x + layer.mlp(layer.layer_norm2(x))
