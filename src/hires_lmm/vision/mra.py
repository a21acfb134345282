"""LLaVA-HR's mixture-of-resolution adaptation (MRA), after ``multipath_encoder_wapper.py``.

* `MRAdapter` = the reference's ``S2FStitchAlignModuleV2``: fuses the ConvNeXt stage-4 map
  (high-resolution, "slow" path) into the ViT token stream ("fast" path) between ViT stages.
* `FinalFusion` = ``MultiPathAlignModule``: ``fast_proj(vit) + slow_proj(resized convnext)``.
* `DualPathEncoder` = ``MultiPathCLIPVisionTower.forward``.

Resizing the ConvNeXt map to the ViT grid follows ``src2dst_align``: bilinear with
``align_corners=True`` (computed in float32) when the map has fewer positions than the ViT grid,
``avg_pool2d`` with kernel = stride = src // dst when it has more, untouched when equal.

Parameter names follow the reference (adapters ``align_stages_latent``, fusion ``align_stages``,
ViT ``fast_vision_tower.vision_tower...``, ConvNeXt ``slow_vision_tower``); see
`DualPathEncoder.convert_reference_state_dict` for the remaining renames.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .convnext import ConvNeXt
from .vit import ViT

__all__ = ["MRAdapter", "FinalFusion", "DualPathEncoder", "resize_to_grid", "lowres_side"]


def resize_to_grid(feat: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bring a (B, C, h, w) map to (B, C, H, W) = grid the way LLaVA-HR aligns paths.

    Fewer positions: bilinear, align_corners=True, in float32. More: average pooling with
    kernel = stride = (h // H, w // W) (the reference asserts divisibility). Equal: unchanged.
    """
    h, w = feat.shape[-2:]
    H, W = grid
    if (h, w) == (H, W):
        return feat
    if h * w < H * W:
        if h > H or w > W:
            raise ValueError(f"cannot align a {h}x{w} map to {H}x{W} (mixed up/down sampling)")
        return F.interpolate(feat.float(), size=(H, W), mode="bilinear", align_corners=True).to(
            feat.dtype
        )
    if h % H or w % W:
        raise ValueError(f"cannot average-pool a {h}x{w} map to {H}x{W}: not an integer factor")
    k = (h // H, w // W)
    return F.avg_pool2d(feat, k, k)


def lowres_side(
    highres_side: int, patch_size: int = 14, vit_side: int = 336, stride: int = 32
) -> int:
    """LLaVA-HR's ViT input side: max(int(S / 32 * 14), 336) (448 for S = 1024)."""
    return max(int(highres_side / stride * patch_size), vit_side)


def _tokens_to_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, d) -> (B, d, h, w)."""
    b, n, d = x.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} tokens do not form a {grid[0]}x{grid[1]} grid")
    return x.transpose(1, 2).reshape(b, d, grid[0], grid[1])


def _square_grid(n: int) -> tuple[int, int]:
    s = int(round(n**0.5))
    if s * s != n:
        raise ValueError(f"{n} tokens are not a square grid; pass grid=(h, w)")
    return s, s


class MRAdapter(nn.Module):
    """Mixture-of-resolution adapter (reference ``S2FStitchAlignModuleV2``).

    ``h = slow_proj(GELU(slow_conv(F_h)))`` resized to the ViT grid;
    ``l = F_l + fast_proj(GELU(fast_conv(F_l)))`` (depthwise 7x7 then 1x1);
    ``g = gate(mean_tokens(concat[l, h]))``; ``out = l + tanh(g) * h``.

    Args:
        fast_dim: ViT width d.
        slow_dim: ConvNeXt stage-4 channels C_h.
        zero_init: zero the 1x1 projections (slow_proj, fast_proj) so the adapter starts as the
            identity (the reference constructs it with True).
        gate: "scalar" (released code: one gate per image) or "channel" (the paper: one per
            channel, last gate Linear d/2 -> d).
    """

    def __init__(
        self,
        fast_dim: int,
        slow_dim: int,
        zero_init: bool = True,
        gate: Literal["scalar", "channel"] = "scalar",
    ) -> None:
        super().__init__()
        if gate not in ("scalar", "channel"):
            raise ValueError(f"gate must be 'scalar' or 'channel', got {gate!r}")
        self.gate_type = gate
        self.slow_conv = nn.Conv2d(slow_dim, slow_dim, 1)
        self.slow_proj = nn.Conv2d(slow_dim, fast_dim, 1)
        self.fast_conv = nn.Conv2d(fast_dim, fast_dim, 7, padding=3, groups=fast_dim)
        self.fast_proj = nn.Conv2d(fast_dim, fast_dim, 1)
        self.gate = nn.Sequential(
            nn.Linear(fast_dim * 2, fast_dim // 2),
            nn.GELU(),
            nn.Linear(fast_dim // 2, 1 if gate == "scalar" else fast_dim),
        )
        # Reference init: xavier convs with zero bias; projections zero (or xavier); the gate
        # keeps nn.Linear's default init.
        nn.init.xavier_uniform_(self.slow_conv.weight)
        nn.init.xavier_uniform_(self.fast_conv.weight)
        assert self.slow_conv.bias is not None and self.fast_conv.bias is not None  # built with bias=True
        nn.init.zeros_(self.slow_conv.bias)
        nn.init.zeros_(self.fast_conv.bias)
        for proj in (self.slow_proj, self.fast_proj):
            if zero_init:
                nn.init.zeros_(proj.weight)
            else:
                nn.init.xavier_uniform_(proj.weight)
            assert proj.bias is not None  # built with bias=True
            nn.init.zeros_(proj.bias)

    def forward(
        self, fast: torch.Tensor, slow: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """fast: ViT tokens (B, h*w, d); slow: ConvNeXt map (B, C_h, h', w') -> (B, h*w, d).

        ``grid`` = (h, w) of the tokens (square when omitted, as the reference assumes).
        """
        grid = grid or _square_grid(fast.shape[1])
        h = self.slow_proj(F.gelu(self.slow_conv(slow)))  # at the ConvNeXt resolution
        h = resize_to_grid(h, grid).flatten(2).transpose(1, 2)  # (B, h*w, d)
        fmap = _tokens_to_map(fast, grid)
        fmap = fmap + self.fast_proj(F.gelu(self.fast_conv(fmap)))
        lo = fmap.flatten(2).transpose(1, 2)  # (B, h*w, d)
        g = self.gate(torch.cat([lo, h], dim=-1).mean(1)).unsqueeze(1)  # (B, 1, 1 or d)
        return lo + h * g.tanh()


class FinalFusion(nn.Module):
    """LLaVA-HR's final path fusion (reference ``MultiPathAlignModule``).

    ``V = fast_proj(F_l) + slow_proj(resize(F_h))``: (B, h*w, d), (B, C_h, h', w') -> (B, h*w, d).
    """

    def __init__(self, fast_dim: int, slow_dim: int) -> None:
        super().__init__()
        self.fast_proj = nn.Linear(fast_dim, fast_dim)
        self.slow_proj = nn.Linear(slow_dim, fast_dim)

    def forward(
        self, fast: torch.Tensor, slow: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        grid = grid or _square_grid(fast.shape[1])
        s = resize_to_grid(slow, grid).flatten(2).transpose(1, 2)  # (B, h*w, C_h)
        return self.fast_proj(fast) + self.slow_proj(s)


class DualPathEncoder(nn.Module):
    """LLaVA-HR's dual-pathway encoder (reference ``MultiPathCLIPVisionTower``).

    The ViT's blocks are split into 4 equal stages; after each of the first three an `MRAdapter`
    injects the ConvNeXt stage-4 map; the last block's output (no post-LN) is fused with the map
    by `FinalFusion`.

    Args:
        vit: the low-resolution ViT (CLIP-L/14-336).
        convnext: the high-resolution ConvNeXt (ConvNeXt-L).
        adapters: build and use the MR-adapters (the reference enables them when the vision
            towers are trained; stage 1 runs without).
        gate: adapter gate, "scalar" (code) or "channel" (paper).
        pos_antialias: position-embedding resize setting for the ViT; True = LLaVA-HR's
            ``resample_pos_embed`` (bicubic, antialias=True).
    """

    def __init__(
        self,
        vit: ViT,
        convnext: ConvNeXt,
        adapters: bool = True,
        gate: Literal["scalar", "channel"] = "scalar",
        pos_antialias: bool = True,
    ) -> None:
        super().__init__()
        if vit.num_layers % 4:
            raise ValueError(f"the ViT's {vit.num_layers} blocks do not split into 4 stages")
        self.fast_vision_tower = vit
        self.slow_vision_tower = convnext
        self.enable_adapter = adapters
        self.pos_antialias = pos_antialias
        d, c = vit.hidden_size, convnext.hidden_size
        if adapters:
            self.align_stages_latent = nn.ModuleList(
                [MRAdapter(d, c, zero_init=True, gate=gate) for _ in range(3)]
            )
        self.align_stages = nn.ModuleList([FinalFusion(d, c)])

    @property
    def vit(self) -> ViT:
        return self.fast_vision_tower

    @property
    def convnext(self) -> ConvNeXt:
        return self.slow_vision_tower

    @property
    def adapters(self) -> nn.ModuleList | None:
        return self.align_stages_latent if self.enable_adapter else None

    @property
    def fusion(self) -> FinalFusion:
        return self.align_stages[0]  # type: ignore[return-value]

    @property
    def hidden_size(self) -> int:
        return self.vit.hidden_size

    def lowres_side(self, highres_side: int) -> int:
        """ViT input side for a high-res side S: max(int(S/32*p), ViT image size)."""
        vit, cn = self.vit, self.convnext
        return lowres_side(highres_side, vit.patch_size, vit.image_size, cn.stride)

    def make_lowres(self, highres: torch.Tensor) -> torch.Tensor:
        """The reference's low-res input: bilinear (align_corners=True, float32) resize."""
        side = self.lowres_side(highres.shape[-1])
        return F.interpolate(
            highres.float(), size=(side, side), mode="bilinear", align_corners=True
        ).to(highres.dtype)

    def forward(self, highres: torch.Tensor, lowres: torch.Tensor | None = None) -> torch.Tensor:
        """highres: (B, 3, S, S); lowres: (B, 3, L, L) or None -> (B, (L/p)², d)."""
        if lowres is None:
            lowres = self.make_lowres(highres)
        vit = self.vit
        p = vit.patch_size
        grid = (lowres.shape[-2] // p, lowres.shape[-1] // p)
        # CLS dropped right after the embeddings (then pre-LN), so it never enters the blocks.
        y = vit.embed(lowres, drop_cls=True, antialias=self.pos_antialias)
        x = self.convnext.forward_features(highres)  # stage-4 map (B, C_h, S/32, S/32)
        n = vit.num_layers // 4
        for stage in range(4):
            y = vit.run_layers(y, stage * n, (stage + 1) * n)
            if stage < 3 and self.enable_adapter:
                y = self.align_stages_latent[stage](y, x.to(y.dtype), grid)
        return self.align_stages[0](y, x.to(y.dtype), grid)

    def convert_reference_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], prefix: str = ""
    ) -> dict[str, torch.Tensor]:
        """Rename a LLaVA-HR ``MultiPathCLIPVisionTower`` state dict (keys under ``prefix``,
        e.g. ``model.vision_tower.``) to this module's names.

        ``slow_vision_tower.vision_tower.X`` -> ``slow_vision_tower.X`` (layer scale ``weight`` ->
        ``gamma``, classifier head dropped); ``fast_vision_tower.vision_tower.vision_model.X`` ->
        ``fast_vision_tower.vision_tower.X`` when the installed transformers (5.x) has no
        ``vision_model`` level; adapters and fusion keep their names.
        """
        flat_hf = self.vit._core is self.vit.vision_tower
        out: dict[str, torch.Tensor] = {}
        slow: dict[str, torch.Tensor] = {}
        for k, v in state_dict.items():
            if not k.startswith(prefix):
                continue
            k = k[len(prefix) :]
            if k.startswith("slow_vision_tower.vision_tower."):
                slow[k[len("slow_vision_tower.vision_tower.") :]] = v
                continue
            if flat_hf:
                k = re.sub(
                    r"^fast_vision_tower\.vision_tower\.vision_model\.",
                    "fast_vision_tower.vision_tower.",
                    k,
                )
            out[k] = v
        for k, v in ConvNeXt.convert_state_dict(slow).items():
            out["slow_vision_tower." + k] = v
        return out
