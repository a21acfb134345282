"""SliME's connector parts: the resampler, the gated mixture of adapters, the text-guided selector.

Follows the released code (yfzhang114/SliME):

* :class:`SlimeResampler` — ``llava/model/multimodal_resampler/sampler.py: Resampler`` with
  ``use_post_proj=False``: learnable queries on a √Q×√Q grid, fixed 2-D sin-cos positions added to
  the queries and (resized bicubically to the key grid) to the keys, LayerNorms (eps 1e-6) on the
  queries, the keys/values and the output, one ``nn.MultiheadAttention``. "No output projection"
  means no ``proj`` Linear after ``ln_post``; the attention's own ``out_proj`` is there.
  Used twice: expert 1 of the global view's gated mixture (576 queries, ``mm_projector.attn``) and
  the local view's compression resampler (144 queries, ``sampler.post_qformer``).
* :class:`GatedMixture` — ``llava/model/multimodal_projector/builder.py: GatedBlock``
  (``mm_projector``): per-token mixture of expert 0 = projector(x) and expert 1 =
  projector(resampler(x)) with a zero-initialised gate.
* :func:`text_guided_select` — ``llava/model/multimodal_resampler/builder.py: TextGuidedSampler``
  with the ``cosine`` router (``TextGuidedRouterCosine``): top-p selection of local tokens by their
  summed cosine similarity to the prompt's word embeddings.

Parameter names mirror the reference state dicts (``query``, ``pos_embed``, ``attn.in_proj_weight``,
``attn.out_proj``, ``ln_q``, ``ln_kv``, ``ln_post``; ``projection``, ``attn``, ``w_gate``,
``w_noise``). The reference's unused ``mean``/``std`` buffers of ``GatedBlock`` are not kept (a
converter drops them).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GatedMixture",
    "SlimeResampler",
    "resize_pos_embed",
    "sincos_pos_embed_2d",
    "text_guided_select",
    "text_guided_select_batched",
    "text_relevance",
]


# --------------------------------------------------------------------------- positions


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE style, as the reference): (grid², dim), float32.

    Row ``y·grid + x``: the first half encodes the column x, the second half the row y (the
    reference's ``meshgrid(grid_w, grid_h)`` puts w first); each half is
    ``[sin(p·ω), cos(p·ω)]`` with ``ω_k = 1 / 10000^(k / (dim/4))``, k < dim/4.
    """
    assert dim % 4 == 0, dim
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float32) / q)  # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                            torch.arange(grid, dtype=torch.float32), indexing="ij")

    def emb_1d(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega  # (grid², dim/4)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([emb_1d(xs), emb_1d(ys)], dim=1)


def resize_pos_embed(pos: Tensor, size: tuple[int, int]) -> Tensor:
    """(s², dim) on an s×s grid → (h·w, dim), bicubic, ``align_corners=False``, computed in
    float32 and cast back (the reference's ``get_abs_pos``). Same size returns ``pos`` (bicubic at
    scale 1 is the identity)."""
    s = int(round(math.sqrt(pos.shape[0])))
    if (s, s) == tuple(size):
        return pos
    x = pos.float().reshape(1, s, s, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)


# --------------------------------------------------------------------------- resampler


class SlimeResampler(nn.Module):
    """One-layer perceiver resampler with 2-D sin-cos positions.

    Args:
        num_queries: Q, a square (576 for the gated expert, 144 for the compression resampler).
        dim: width d of queries, keys and values (the vision width; no ``kv_proj`` is needed since
            the reference builds it with ``kv_dim == embed_dim``).
        num_heads: attention heads (the reference: ``mm_hidden_size // 128`` = 8 for d = 1024).
        kv_grid: the nominal key grid (24 for 576 patch tokens). The key grid actually used is
            √L of the input, as the reference infers it.

    ``pos_embed`` is a frozen parameter initialised to fp16-rounded values (the reference builds it
    in float16); ``query`` is truncated-normal (std 0.02).
    """

    def __init__(self, num_queries: int, dim: int, num_heads: int = 8, kv_grid: int = 24) -> None:
        super().__init__()
        g = int(round(math.sqrt(num_queries)))
        if g * g != num_queries:
            raise ValueError(f"num_queries must be a square, got {num_queries}")
        self.num_queries, self.grid_size, self.kv_grid = num_queries, g, kv_grid
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, g).half().float(), requires_grad=False)
        self.query = nn.Parameter(torch.empty(num_queries, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L, d) with L a square (576 = 24²) → (B, Q, d)."""
        B, L, d = x.shape
        s = int(round(math.sqrt(L)))
        if s * s != L:
            raise ValueError(f"the resampler needs a square token grid, got {L} tokens")
        pos_q = self.pos_embed.to(x.dtype)
        pos_k = resize_pos_embed(self.pos_embed, (s, s)).to(x.dtype)  # 12×12 → 24×24 for Q = 144
        kv = self.ln_kv(x)
        q = (self.ln_q(self.query) + pos_q).unsqueeze(0).expand(B, -1, -1)
        out = self.attn(q, kv + pos_k, kv, need_weights=False)[0]  # values carry no position
        return self.ln_post(out)


# --------------------------------------------------------------------------- gated mixture


class GatedMixture(nn.Module):
    """Per-token gated mixture of two adapters (the reference's ``GatedBlock``).

    Expert 0 = ``projector(x)``, expert 1 = ``projector(resampler(x))`` (the projector is shared).
    Gate: ``logits = x·W_g`` (W_g: (d, 2), zero-initialised, so both experts start at weight ½);
    in training ``logits += N(0,1)·(softplus(x·W) + 0.01)``; ``g = softmax(logits)``, renormalised as
    the reference's top-k with k = 2 = all experts does, ``g / (Σg + 1e-6)``;
    ``out = Σ_e g_e · expert_e``.

    Args:
        dim: vision width d.
        projector: any module (…, d) → (…, D), e.g. mlp2x_gelu.
        resampler: a :class:`SlimeResampler` whose query count equals the token count it mixes (576).
        noise_weight: which matrix W scales the training noise. The released code (HEAD, since the
            2024-07-15 "wnoise" commit) uses ``w_gate`` again; ``w_noise`` exists in its state dict
            but is unused. ``"noise"`` uses ``w_noise`` (the 2024-07-12 … 07-15 code).
        fixed_expert: the reference's ``mm_learnable_gated`` ≥ 0 (training stages 1a/1b): return that
            expert only, no gate. ``None`` (= -1) mixes.
        noise_epsilon, renorm_eps: the reference's 1e-2 and 1e-6.

    Token sequences whose length differs from the resampler's query count go through the projector
    only — this is how the reference projects the local view's 144-token tiles with the same module.
    """

    def __init__(self, dim: int, projector: nn.Module, resampler: SlimeResampler, *,
                 noise_weight: Literal["gate", "noise"] = "gate", fixed_expert: int | None = None,
                 noise_epsilon: float = 1e-2, renorm_eps: float = 1e-6) -> None:
        super().__init__()
        if noise_weight not in ("gate", "noise"):
            raise ValueError(f"noise_weight must be 'gate' or 'noise', not {noise_weight!r}")
        if fixed_expert not in (None, 0, 1):
            raise ValueError(f"fixed_expert must be None, 0 or 1, not {fixed_expert!r}")
        self.projection = projector
        self.attn = resampler
        self.num_experts = 2
        self.w_gate = nn.Parameter(torch.zeros(dim, self.num_experts))
        self.w_noise = nn.Parameter(torch.zeros(dim, self.num_experts))
        self.noise_weight, self.fixed_expert = noise_weight, fixed_expert
        self.noise_epsilon, self.renorm_eps = noise_epsilon, renorm_eps

    def gates(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x: (B, L, d) → per-token expert weights (B, L, 2). Noisy only in training mode."""
        logits = x @ self.w_gate.to(x.dtype)
        if self.training:
            w = self.w_gate if self.noise_weight == "gate" else self.w_noise
            std = F.softplus(x @ w.to(x.dtype)) + self.noise_epsilon
            noise = torch.randn(logits.shape, generator=generator, device=x.device, dtype=x.dtype)
            logits = logits + noise * std
        g = logits.softmax(dim=-1)
        return g / (g.sum(dim=-1, keepdim=True) + self.renorm_eps)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x: (B, L, d) → (B, L, D); L = the resampler's query count (576) for the mixture."""
        if x.shape[-2] != self.attn.num_queries or self.fixed_expert == 0:
            return self.projection(x)
        expert1 = self.projection(self.attn(x))
        if self.fixed_expert == 1:
            return expert1
        g = self.gates(x, generator).to(expert1.dtype)
        return g[..., :1] * self.projection(x) + g[..., 1:] * expert1


# --------------------------------------------------------------------------- selector


def text_relevance(tokens: Tensor, text: Tensor, text_mask: Tensor | None = None) -> Tensor:
    """Σ over text tokens of cos(token, text token) (the reference's ``TextGuidedRouterCosine``).

    tokens: (…, n, D); text: (…, t, D); text_mask: (…, t) bool/0-1, False = padding or image slot
    (those similarities count 0, as the reference's ``masked_fill``). Returns (…, n), float32.
    Computed as each L2-normalised token (eps 1e-8) dotted with the sum of the normalised text
    tokens, instead of the reference's broadcast (n, t, D) ``cosine_similarity``; equal up to
    rounding, without the n·t·D intermediate.
    """
    a = F.normalize(tokens.float(), dim=-1, eps=1e-8)
    b = F.normalize(text.float(), dim=-1, eps=1e-8)
    if text_mask is not None:
        b = b * text_mask.to(b.dtype).unsqueeze(-1)
    # Σ_j a·b_j = a·(Σ_j b_j): one matrix-vector product instead of an (n, t) matrix.
    return (a @ b.sum(dim=-2).unsqueeze(-1)).squeeze(-1)


def text_guided_select_batched(
    tokens: Tensor, text: Tensor, p: float = 0.95, *, token_mask: Tensor | None = None,
    text_mask: Tensor | None = None, training: bool = False, noise_std: float = 0.1,
    variant: Literal["spec", "released"] = "spec", temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Top-p selection over a padded batch.

    tokens: (B, N, D) local tokens in LLM space, padded; token_mask: (B, N), True = real token;
    text: (B, T, D) the prompt's word embeddings; text_mask: (B, T), True = counted.
    Returns the keep mask (B, N) bool (never True on padding). See :func:`text_guided_select`.
    """
    if variant not in ("spec", "released"):
        raise ValueError(f"variant must be 'spec' or 'released', not {variant!r}")
    B, N, _ = tokens.shape
    valid = (torch.ones(B, N, dtype=torch.bool, device=tokens.device) if token_mask is None
             else token_mask.to(torch.bool))
    if p >= 1:  # stages 1–2: keep all (and no float-rounding of the cumsum can drop one)
        return valid.clone()
    neg = torch.tensor(float("-inf"), device=tokens.device)
    scores = torch.where(valid, text_relevance(tokens, text, text_mask), neg)
    if variant == "released":
        # Mid-2024 code (2024-06-02 … 2024-11-08): an extra softmax at temperature 0.5 turns the
        # scores into probabilities (~1/N each) before the noise and the main softmax; the main
        # softmax over values in [0, 1] is then nearly uniform, so ~p·N tokens are kept.
        scores = torch.where(valid, (scores / 0.5).softmax(dim=-1).nan_to_num(0.0), neg)
    if training:
        noise = torch.randn(scores.shape, generator=generator, device=scores.device, dtype=scores.dtype)
        scores = scores + noise * noise_std  # -inf stays -inf on padding
    probs = (scores / temperature).softmax(dim=-1).nan_to_num(0.0)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    # The reference keeps the sorted prefix with cumsum ≤ p plus one more token (all if none is
    # left): the smallest top set reaching p, except that a cumsum landing exactly on p adds one.
    count = (sorted_p.cumsum(dim=-1) <= p).sum(dim=-1)
    keep_n = torch.minimum(count + 1, valid.sum(dim=-1))
    ranks = torch.arange(N, device=tokens.device).expand(B, N)
    return torch.zeros_like(valid).scatter(1, order, ranks < keep_n.unsqueeze(1))


def text_guided_select(
    tokens: Tensor, text: Tensor, p: float = 0.95, *, training: bool = False, noise_std: float = 0.1,
    variant: Literal["spec", "released"] = "spec", temperature: float = 1.0,
    text_mask: Tensor | None = None, generator: torch.Generator | None = None,
) -> Tensor:
    """SliME's text-guided token selector (no parameters): which local tokens the LLM gets.

    tokens: (n, D) local tokens in LLM embedding space (after the projector, in raster order);
    text: (t, D) the LLM's input word embeddings of the prompt (image slots and padding excluded,
    or masked with ``text_mask`` (t,)). Returns the kept indices, a LongTensor (k,), ascending
    (original order), 1 ≤ k ≤ n (k = n for p ≥ 1).

    1. score_i = Σ_j cos(tokens_i, text_j) (:func:`text_relevance`);
    2. ``variant="released"``: score = softmax(score / 0.5) first (see below);
    3. training: score += N(0, noise_std²);
    4. probs = softmax(score / temperature) (the released scripts use temperature 1.0);
    5. keep the highest-probability tokens whose cumulative probability first exceeds p
       (p = 0.95 in stage 3 and at inference; p = 1 keeps everything).

    ``variant="spec"`` is the code at HEAD (2024-11-08), where the extra softmax is commented out.
    ``variant="released"`` is the code of 2024-06-02 … 2024-11-08, which applied
    ``softmax(score / 0.5)`` before step 3; its probabilities (~1/n each) then pass through the
    temperature-1 softmax of step 4, which is nearly uniform over values in [0, 1], so about p·n
    tokens are kept whatever the text (in training the 0.1 noise, much larger than 1/n, decides
    which). Computed in float32 (the reference runs in the model dtype, bf16 in training); ties are
    broken by position (stable sort).
    """
    keep = text_guided_select_batched(
        tokens.unsqueeze(0), text.unsqueeze(0), p,
        text_mask=None if text_mask is None else text_mask.unsqueeze(0), training=training,
        noise_std=noise_std, variant=variant, temperature=temperature, generator=generator)
    return keep[0].nonzero().squeeze(1)
