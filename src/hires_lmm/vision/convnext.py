"""ConvNeXt in pure torch, with timm's state-dict names.

LLaVA-HR's high-resolution pathway is timm's ``convnext_large_mlp`` (open_clip
CLIP-ConvNeXt-L weights) run through ``stem`` and the four ``stages`` only; the classifier head is
never used. This module rebuilds that trunk (patch stem, ``conv_mlp=False`` blocks: depthwise 7x7
-> channels-last LayerNorm -> Linear -> GELU -> Linear -> layer scale, residual) with the same
parameter names, so timm / open_clip / LLaVA-HR weights load by name:

    stem.0 (Conv 4x4/4), stem.1 (LayerNorm2d),
    stages.{i}.downsample.{0: LayerNorm2d, 1: Conv 2x2/2}   (stages 1-3),
    stages.{i}.blocks.{j}.conv_dw / norm / mlp.fc1 / mlp.fc2 / gamma

`ConvNeXt.convert_state_dict` also accepts open_clip's ``visual.trunk.`` prefix, the layer-scale
name ``weight`` used by LLaVA-HR's vendored timm copy (and old timm), and drops the classifier
head (``head.*``, ``norm_pre.*``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ConvNeXtConfig", "ConvNeXt", "ConvNeXtStage", "ConvNeXtBlock", "LayerNorm2d"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_MODEL_TYPE = "hires_lmm_convnext"


@dataclass
class ConvNeXtConfig:
    """ConvNeXt trunk hyper-parameters (timm defaults)."""

    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    in_chans: int = 3
    patch_size: int = 4
    kernel_size: int = 7
    mlp_ratio: float = 4.0
    ls_init_value: float | None = 1e-6
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    model_type: str = field(default=_MODEL_TYPE)

    def __post_init__(self) -> None:
        self.depths = tuple(int(d) for d in self.depths)
        self.dims = tuple(int(d) for d in self.dims)
        if len(self.depths) != 4 or len(self.dims) != 4:
            raise ValueError("ConvNeXt has 4 stages: depths and dims need 4 entries")

    @classmethod
    def convnext_tiny(cls, **kw: Any) -> ConvNeXtConfig:
        """ConvNeXt-T: depths 3-3-9-3, dims 96/192/384/768."""
        return cls(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), **kw)

    @classmethod
    def convnext_large(cls, **kw: Any) -> ConvNeXtConfig:
        """ConvNeXt-L (LLaVA-HR's ``convnext_large_mlp`` trunk): 3-3-27-3, 192/384/768/1536."""
        return cls(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), **kw)

    @classmethod
    def convnext_xxlarge(cls, **kw: Any) -> ConvNeXtConfig:
        """ConvNeXt-XXL (LLaVA-HR's 'xxlarge' option): 3-4-30-3, 384..3072, LN eps 1e-5."""
        kw.setdefault("norm_eps", 1e-5)
        return cls(depths=(3, 4, 30, 3), dims=(384, 768, 1536, 3072), **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConvNeXtConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ConvNeXt config keys: {sorted(unknown)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["depths"], d["dims"] = list(self.depths), list(self.dims)
        return d


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, H, W) map (timm's ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _Mlp(nn.Module):
    """Linear -> GELU -> Linear (timm ``Mlp`` names: fc1, fc2)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 -> LN (channels-last) -> MLP -> layer scale, residual. (B,C,H,W) -> same."""

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = 1e-6,
        norm_eps: float = 1e-6,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = _Mlp(dim, int(mlp_ratio * dim))
        self.gamma = (
            nn.Parameter(ls_init_value * torch.ones(dim)) if ls_init_value is not None else None
        )
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = self.mlp(self.norm(x))
        if self.gamma is not None:
            x = x * self.gamma
        x = x.permute(0, 3, 1, 2)
        return shortcut + _drop_path(x, self.drop_path, self.training)


class ConvNeXtStage(nn.Module):
    """Optional downsample (LayerNorm2d + 2x2/2 conv) then blocks: (B,C_in,H,W) -> (B,C,H',W')."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        depth: int,
        stride: int,
        cfg: ConvNeXtConfig,
        drop_path_rates: list[float],
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        if in_chs != out_chs or stride > 1:
            self.downsample: nn.Module = nn.Sequential(
                LayerNorm2d(in_chs, eps=cfg.norm_eps),
                nn.Conv2d(in_chs, out_chs, kernel_size=stride, stride=stride),
            )
        else:
            self.downsample = nn.Identity()  # stage 0: no parameters, as timm
        self.blocks = nn.Sequential(
            *[
                ConvNeXtBlock(
                    out_chs, cfg.kernel_size, cfg.mlp_ratio, cfg.ls_init_value, cfg.norm_eps, r
                )
                for r in drop_path_rates
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
            return x
        return self.blocks(x)


class ConvNeXt(nn.Module):
    """ConvNeXt trunk (no head). Stage i output: (B, dims[i], H/4/2^i, W/4/2^i)."""

    def __init__(self, config: ConvNeXtConfig | None = None) -> None:
        super().__init__()
        cfg = config or ConvNeXtConfig()
        self.config = cfg
        d0 = cfg.dims[0]
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_chans, d0, kernel_size=cfg.patch_size, stride=cfg.patch_size),
            LayerNorm2d(d0, eps=cfg.norm_eps),
        )
        n = sum(cfg.depths)  # linspace in Python: also works under a meta-device context
        rates = [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        stages, prev, k = [], d0, 0
        for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
            stages.append(
                ConvNeXtStage(prev, dim, depth, 1 if i == 0 else 2, cfg, rates[k : k + depth])
            )
            prev, k = dim, k + depth
        self.stages = nn.Sequential(*stages)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # timm's _init_weights: trunc-normal(0.02) convs and linears, zero biases.
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ properties
    @property
    def dims(self) -> tuple[int, ...]:
        return self.config.dims

    @property
    def hidden_size(self) -> int:
        """Channels of the last stage (1536 for ConvNeXt-L)."""
        return self.config.dims[-1]

    @property
    def stride(self) -> int:
        """Total stride of the stage-4 map (32)."""
        return self.config.patch_size * 8

    @property
    def gradient_checkpointing(self) -> bool:
        return all(s.gradient_checkpointing for s in self.stages)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        for s in self.stages:
            # nn.Sequential iterates as nn.Module; every stage is a ConvNeXtStage (built in __init__)
            cast(ConvNeXtStage, s).gradient_checkpointing = bool(enable)

    # ------------------------------------------------------------------ computation
    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, dims[0], H/4, W/4)."""
        # nn.Sequential indexes as nn.Module; the stem's first layer is the patchify Conv2d
        return self.stem(x.to(cast(nn.Conv2d, self.stem[0]).weight.dtype))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> the 4 stage outputs (B, dims[i], H/4/2^i, W/4/2^i)."""
        x = self.forward_stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> stage-4 map (B, dims[3], H/32, W/32)."""
        x = self.forward_stem(x)
        return self.stages(x)

    # ------------------------------------------------------------------ weights
    @staticmethod
    def convert_state_dict(
        state_dict: Mapping[str, torch.Tensor], prefix: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Map timm / open_clip / LLaVA-HR ConvNeXt weights to this module's names.

        * ``prefix`` (or open_clip's ``visual.trunk.`` when present): keep only keys under it,
          stripped;
        * ``stages.i.blocks.j.weight`` (layer scale in LLaVA-HR's timm copy) -> ``.gamma``;
        * classifier head keys (``head.*``, ``norm_pre.*``) dropped: this trunk has no head.
        Anything else is passed through, so `load_state_dict` can name unknown keys.
        """
        if prefix is None and any(k.startswith("visual.trunk.") for k in state_dict):
            prefix = "visual.trunk."
        out: dict[str, torch.Tensor] = {}
        for k, v in state_dict.items():
            if prefix:
                if not k.startswith(prefix):
                    continue
                k = k[len(prefix) :]
            if k.startswith(("head.", "norm_pre.")):
                continue
            k = re.sub(r"^(stages\.\d+\.blocks\.\d+)\.weight$", r"\1.gamma", k)
            out[k] = v
        return out

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """As nn.Module's, but a strict load names every missing / unexpected / misshaped key."""
        if strict:
            own = self.state_dict()
            missing = sorted(set(own) - set(state_dict))
            unexpected = sorted(set(state_dict) - set(own))
            shapes = sorted(
                f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                for k in set(own) & set(state_dict)
                if tuple(state_dict[k].shape) != tuple(own[k].shape)
            )
            if missing or unexpected or shapes:
                raise ValueError(
                    "ConvNeXt state dict does not match: "
                    f"missing keys {missing}, unexpected keys {unexpected}, "
                    f"shape mismatches {shapes}"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        config: ConvNeXtConfig | None = None,
        prefix: str | None = None,
    ) -> ConvNeXt:
        """Load local weights: a directory (``config.json`` + ``model.safetensors`` or a
        ``*.bin``/``*.pt``/``*.pth``) or a weights file itself.

        The config comes from ``config`` if given, else the ``config.json`` beside the weights,
        else ConvNeXt-L (LLaVA-HR's). Keys go through `convert_state_dict`; the load is strict.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            root, weights = path, _find_weights(path)
        elif os.path.isfile(path):
            root, weights = os.path.dirname(path), path
        else:
            raise FileNotFoundError(f"ConvNeXt weights not found: {path!r}")
        if config is None:
            cfg_file = os.path.join(root, CONFIG_NAME)
            if os.path.isfile(cfg_file):
                with open(cfg_file, encoding="utf-8") as f:
                    d = json.load(f)
                if d.get("model_type") != _MODEL_TYPE:
                    raise ValueError(f"{cfg_file!r} is not a hires_lmm ConvNeXt config")
                config = ConvNeXtConfig.from_dict(d)
            else:
                config = ConvNeXtConfig.convnext_large()
        model = cls(config)
        sd = _load_weights(weights)
        model.load_state_dict(cls.convert_state_dict(sd, prefix))
        return model

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``directory``."""
        from safetensors.torch import save_file

        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(sd, os.path.join(directory, WEIGHTS_NAME))


def _find_weights(directory: str) -> str:
    preferred = [WEIGHTS_NAME, "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    for name in preferred:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    found = sorted(
        n for n in os.listdir(directory) if n.endswith((".safetensors", ".bin", ".pt", ".pth"))
    )
    if len(found) == 1:
        return os.path.join(directory, found[0])
    raise FileNotFoundError(
        f"no single ConvNeXt weights file in {directory!r} (found {found or 'none'})"
    )


def _load_weights(file: str) -> dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file)
    sd = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd
