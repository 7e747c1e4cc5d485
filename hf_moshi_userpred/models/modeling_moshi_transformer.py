"""Transformer blocks of Moshi: norms, positional encodings, attention, feed-forward, layers.

Parameter names and shapes follow kyutai's ``moshi.modules.transformer`` so that moshi state dicts
load without renaming inside a transformer (``self_attn.in_projs.{i}``, ``gating.{i}.linear_in``,
``norm1.alpha``, ``layer_scale_1.scale``...). Weights per step (moshi's Depformer) are ModuleLists of
plain ``nn.Linear`` so PEFT can wrap every one of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .modeling_moshi_cache import MoshiKVCache


class MoshiRMSNorm(nn.Module):
    """RMS norm with moshi's parameter `alpha` of shape `[1, 1, dim]`, optionally computed in float32."""

    def __init__(self, dim: int, eps: float, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.compute_dtype = compute_dtype
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        var = self.eps + torch.mean(x**2, dim=-1, keepdim=True)
        return (x * (self.alpha.to(var) * torch.rsqrt(var))).to(x_dtype)


class MoshiLayerNormF32(nn.LayerNorm):
    """Layer norm computed in float32 whatever the input and parameter dtypes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def create_norm(norm: str, dim: int) -> nn.Module:
    """The norm named by a moshi config (`layer_norm`, `layer_norm_f32`, `rms_norm`, `rms_norm_f32`)."""
    if norm == "layer_norm":
        return nn.LayerNorm(dim, eps=1e-5)
    if norm == "layer_norm_f32":
        return MoshiLayerNormF32(dim, eps=1e-8)
    if norm == "rms_norm":
        return MoshiRMSNorm(dim, eps=1e-5)
    if norm == "rms_norm_f32":
        return MoshiRMSNorm(dim, eps=1e-8, compute_dtype=torch.float32)
    raise ValueError(f"unknown norm {norm!r}")


class MoshiLayerScale(nn.Module):
    """Per-channel residual scale (Touvron et al. 2021), moshi's `LayerScale`."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.init_value = init
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


def sin_embedding(positions: torch.Tensor, dim: int, max_period: float, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embedding `[B, T, dim]` of integer `positions` `[B, T]`, computed in `dtype` like moshi."""
    half = dim // 2
    positions = positions[..., None].to(dtype)
    adim = torch.arange(half, device=positions.device, dtype=dtype).view(1, 1, -1)
    period = torch.full([], max_period, device=positions.device, dtype=dtype)
    phase = positions / (period ** (adim / (half - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, max_period: float, interleave: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries `[B, H, T, D]` and keys `[B, Hkv, T, D]` by their `positions` `[B, T]` (float32 math)."""
    D = q.shape[-1]
    freqs = torch.exp(torch.arange(D // 2, device=q.device, dtype=torch.float32) * (-math.log(max_period) * 2 / D))
    ts = positions.float()[:, None, :, None]
    rotr, roti = torch.cos(freqs * ts), torch.sin(freqs * ts)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        if interleave:
            pairs = x.view(*x.shape[:-1], D // 2, 2)
            xr, xi = pairs[..., 0].float(), pairs[..., 1].float()
        else:
            xr, xi = x[..., : D // 2].float(), x[..., D // 2 :].float()
        outr, outi = (xr * rotr - xi * roti).to(x.dtype), (xr * roti + xi * rotr).to(x.dtype)
        if interleave:
            return torch.stack([outr, outi], dim=-1).view(x.shape)
        return torch.cat([outr, outi], dim=-1)

    return rotate(q), rotate(k)


def apply_weights_per_step(
    modules: nn.ModuleList, schedule: list[int] | None, x: torch.Tensor, step_offset: int
) -> torch.Tensor:
    """Apply `modules[schedule[step_offset + t]]` to time step t of `x` `[B, T, C]` (one module: to all)."""
    if len(modules) == 1:
        return modules[0](x)
    outputs = []
    # `split` rather than per-step slices: its backward is one concatenation, not a zero-filled full grad per step.
    for index, step in enumerate(x.split(1, dim=1), start=step_offset):
        outputs.append(modules[schedule[index] if schedule is not None else index](step))
    return torch.cat(outputs, dim=1)


class MoshiAttention(nn.Module):
    """Causal multi-head self-attention with fused QKV projections, optional window, RoPE and GQA.

    With weights per step, `in_projs` / `out_projs` hold one projection per weight set and position
    `step_offset + t` uses set `schedule[step_offset + t]` (moshi's Depformer).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kv_repeat: int = 1,
        context: int | None = None,
        rope: dict | None = None,
        num_weight_sets: int = 1,
        schedule: list[int] | None = None,
    ):
        super().__init__()
        self.layer_idx = 0  # set by MoshiTransformer: which layer of a MoshiKVCache this attention reads
        self.dim, self.num_heads, self.kv_repeat = dim, num_heads, kv_repeat
        self.head_dim = dim // num_heads
        self.num_kv_heads = num_heads // kv_repeat
        self.context = context
        self.rope = rope
        self.schedule = schedule
        qkv_dim = dim + 2 * self.num_kv_heads * self.head_dim
        self.in_projs = nn.ModuleList([nn.Linear(dim, qkv_dim, bias=False) for _ in range(num_weight_sets)])
        self.out_projs = nn.ModuleList([nn.Linear(dim, dim, bias=False) for _ in range(num_weight_sets)])

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, step_offset: int = 0, cache: MoshiKVCache | None = None,
        prefill: bool = False,
    ) -> torch.Tensor:
        """`x` `[B, T, dim]`, `positions` `[B or 1, T]` -> `[B, T, dim]`.

        With a `cache`, the T inputs are alternatives for one position per slot (`positions[:, 0]`), each
        attending to the cached window and to itself, or with `prefill` T consecutive positions attending causally;
        their keys/values are left in `cache.pending`.
        """
        B, T, _ = x.shape
        qkv = apply_weights_per_step(self.in_projs, self.schedule, x, step_offset)
        # One split (its backward is one concatenation) rather than two slices (two zero-filled full-size grads).
        q, kv = qkv.split([self.dim, qkv.shape[-1] - self.dim], dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = kv.view(B, T, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rope is not None:
            q, k = apply_rope(q, k, positions.expand(B, T), **self.rope)
        if cache is not None and prefill:
            keys, values, mask = cache.attend_sequence(self.layer_idx, k, v, positions.expand(B, T), self.context)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.kv_repeat > 1)
        elif cache is not None:
            keys, values, mask = cache.attend(self.layer_idx, k, v, positions.expand(B, T)[:, 0], self.context)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.kv_repeat > 1)
        elif self.context is not None and self.context < T:
            delta = positions[:, :, None] - positions[:, None, :]
            mask = ((delta >= 0) & (delta < self.context))[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_repeat > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_repeat > 1)
        out = out.transpose(1, 2).reshape(B, T, self.dim)
        return apply_weights_per_step(self.out_projs, self.schedule, out, step_offset)


class MoshiGatedFeedForward(nn.Module):
    """Gated feed-forward `linear_out(act(a) * b)` with `[a, b] = linear_in(x)` (moshi's `ActivationGating`)."""

    def __init__(self, dim: int, dim_feedforward: int, activation: str):
        super().__init__()
        # moshi's sizing: 21/8 dim for the 4x default, else 2/3 of dim_feedforward (same parameter count).
        hidden = (21 * dim) // 8 if dim_feedforward == 4 * dim else (2 * dim_feedforward) // 3
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)
        self.activation = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_in(x).view(*x.shape[:-1], 2, -1)
        return self.linear_out(self.activation(h[..., 0, :]) * h[..., 1, :])


def _activation(name: str):
    if name in ("sigmoid", "tanh", "relu"):
        return getattr(torch, name)
    if name in ("leaky_relu", "elu", "gelu", "silu", "mish", "softsign"):
        return getattr(F, name)
    if name == "identity":
        return nn.Identity()
    raise ValueError(f"unknown gating activation {name!r}")


class MoshiTransformerLayer(GradientCheckpointingLayer):
    """Pre-norm layer: `x + ls1(attn(norm1(x)))`, then `x + ls2(ff(norm2(x)))`.

    The feed-forward is `gating` (one gated block, or one per weight set) or, with `gating="none"`,
    moshi's GELU MLP `linear2(gelu(linear1(x)))`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dim_feedforward: int | list[int],
        norm: str,
        gating: str,
        layer_scale: float | None,
        kv_repeat: int,
        context: int | None,
        rope: dict | None,
        num_weight_sets: int,
        schedule: list[int] | None,
    ):
        super().__init__()
        self.schedule = schedule
        self.self_attn = MoshiAttention(dim, num_heads, kv_repeat, context, rope, num_weight_sets, schedule)
        self.norm1 = create_norm(norm, dim)
        self.norm2 = create_norm(norm, dim)
        if gating == "none":
            self.linear1 = nn.Linear(dim, dim_feedforward, bias=False)
            self.linear2 = nn.Linear(dim_feedforward, dim, bias=False)
            self.gating = None
        elif num_weight_sets > 1:
            widths = dim_feedforward if isinstance(dim_feedforward, list) else [dim_feedforward] * num_weight_sets
            self.gating = nn.ModuleList([MoshiGatedFeedForward(dim, width, gating) for width in widths])
        else:
            self.gating = MoshiGatedFeedForward(dim, dim_feedforward, gating)
        self.layer_scale_1 = nn.Identity() if layer_scale is None else MoshiLayerScale(dim, layer_scale)
        self.layer_scale_2 = nn.Identity() if layer_scale is None else MoshiLayerScale(dim, layer_scale)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, step_offset: int = 0, cache: MoshiKVCache | None = None,
        prefill: bool = False,
    ) -> torch.Tensor:
        update = self.self_attn(self.norm1(x), positions, step_offset, cache, prefill)
        x = x.to(update) + self.layer_scale_1(update)
        h = self.norm2(x)
        if self.gating is None:
            update = self.linear2(F.gelu(self.linear1(h)))
        elif isinstance(self.gating, nn.ModuleList):
            update = apply_weights_per_step(self.gating, self.schedule, h, step_offset)
        else:
            update = self.gating(h)
        return x.to(update) + self.layer_scale_2(update)


class MoshiTransformer(nn.Module):
    """A stack of `MoshiTransformerLayer` with moshi's positional embeddings (`sin` added to the input,
    `rope` in attention, both for `sin_rope`; `rope_concat` is RoPE on split halves)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_layers: int,
        dim_feedforward: int | list[int],
        norm: str,
        gating: str,
        positional_embedding: str,
        max_period: float,
        positional_scale: float = 1.0,
        layer_scale: float | None = None,
        kv_repeat: int = 1,
        context: int | None = None,
        num_weight_sets: int = 1,
        schedule: list[int] | None = None,
    ):
        super().__init__()
        self.positional_embedding = positional_embedding
        self.max_period = max_period
        self.positional_scale = positional_scale
        rope = None
        if positional_embedding in ("rope", "sin_rope", "rope_concat"):
            rope = {"max_period": max_period, "interleave": positional_embedding != "rope_concat"}
        self.layers = nn.ModuleList(
            [
                MoshiTransformerLayer(dim, num_heads, dim_feedforward, norm, gating, layer_scale, kv_repeat,
                                      context, rope, num_weight_sets, schedule)
                for _ in range(num_layers)
            ]
        )
        for index, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = index

    def make_cache(self, batch_size: int, capacity: int) -> MoshiKVCache:
        """An empty streaming cache of `capacity` positions per slot, on this transformer's device and dtype."""
        attn = self.layers[0].self_attn
        # The dtype the layers compute in, read off a norm: a quantized projection's weight is no guide (torch.ao's
        # dynamic int8 Linear has a `weight()` method instead of a tensor; torchao's hold integers in a subclass).
        norm = next(self.layers[0].norm1.parameters())
        return MoshiKVCache(len(self.layers), batch_size, attn.num_kv_heads, attn.head_dim, capacity,
                            norm.device, norm.dtype)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        step_offset: int = 0,
        cache: MoshiKVCache | None = None,
        prefill: bool = False,
    ) -> torch.Tensor:
        """`x` `[B, T, dim]`, `positions` `[B or 1, T]` (default `0..T-1`) -> `[B, T, dim]` in `x`'s dtype.

        With a `cache` (streaming), the T inputs are alternatives for the position `positions[:, 0]` of each
        stream (T = 1 for a plain step), or with `prefill` T consecutive positions; see `MoshiAttention.forward`.
        """
        input_dtype = x.dtype
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)[None]
        if self.positional_embedding in ("sin", "sin_rope"):
            x = x + self.positional_scale * sin_embedding(positions, x.shape[-1], self.max_period, x.dtype)
        for layer in self.layers:
            x = layer(x, positions, step_offset, cache, prefill)
        return x.to(input_dtype)


__all__ = [
    "MoshiAttention",
    "MoshiGatedFeedForward",
    "MoshiLayerNormF32",
    "MoshiLayerScale",
    "MoshiRMSNorm",
    "MoshiTransformer",
    "MoshiTransformerLayer",
    "apply_rope",
    "apply_weights_per_step",
    "create_norm",
    "sin_embedding",
]
