"""Transformer building blocks shared by the entropy model and BLT's local and global models.

Pre-norm blocks with RMSNorm, rotary position embeddings (RoPE), SwiGLU feed-forward, no biases.
Attention runs under a mask from models/attention.py (dense, in blocks for SDPA, or a FlexAttention block
mask); window_mask is the one a KV-cached stream of a single document needs.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention


def window_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Lq, Lk] boolean mask of one document: a query sees keys at or before it, within the window."""
    distance = query_positions[:, None] - key_positions[None, :]
    allowed = distance >= 0
    return allowed & (distance < window) if window is not None else allowed


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [L, head_dim], for rotating query/key halves by position (the rotate-half form).
    Angles are computed in float64: in float32, positions past a million (a long document streamed
    through a KV cache) would lose the precision that makes a row and a stream agree."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    angles = positions.double()[:, None] * inv_freq[None, :]  # [L, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, L, D] by position: pairs (x[i], x[i + D/2]) turn by their angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@dataclass
class KVCache:
    """Rotated keys and values of the latest positions of one stream, per layer: what lets a stream be
    continued a chunk at a time with exactly the result of one pass over all of it."""

    keys: list[torch.Tensor | None]  # per layer [B, H, kept, head_dim]
    values: list[torch.Tensor | None]
    positions: torch.Tensor  # [kept]: positions of the kept keys
    keep: int  # keys kept: the attention window

    @classmethod
    def empty(cls, n_layers: int, keep: int, device: torch.device) -> "KVCache":
        return cls([None] * n_layers, [None] * n_layers, torch.empty(0, dtype=torch.long, device=device), keep)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, rope_theta: float):
        super().__init__()
        assert dim % n_heads == 0, f"dim {dim} is not a multiple of n_heads {n_heads}"
        self.n_heads, self.head_dim, self.rope_theta = n_heads, dim // n_heads, rope_theta
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x [B, L, dim] at `positions` [L]; with a cache, the mask also covers its kept keys (first)."""
        B, L, D = x.shape
        q, k, v = (w(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        cos, sin = rope_tables(positions, self.head_dim, self.rope_theta, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, H, L, head_dim]
        if cache is not None:
            if cache.keys[layer] is not None:
                k, v = torch.cat([cache.keys[layer], k], dim=2), torch.cat([cache.values[layer], v], dim=2)
            cache.keys[layer], cache.values[layer] = k[:, :, -cache.keep :], v[:, :, -cache.keep :]
        y = attention(q, k, v, mask)  # under any mask from build_mask, or a dense bool mask
        return self.wo(y.transpose(1, 2).reshape(B, L, D))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, ffn_hidden: int, rope_theta: float, norm_eps: float):
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.attention = Attention(dim, n_heads, rope_theta)
        self.ffn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.feed_forward = FeedForward(dim, ffn_hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), mask, positions, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


def swiglu_hidden(dim: int, multiple_of: int) -> int:
    """Hidden width of a SwiGLU block: 2/3 of 4 * dim, rounded up to a multiple (as in Llama and BLT)."""
    return multiple_of * -(-int(8 * dim / 3) // multiple_of)


def init_weights(model: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """Normal(0, std) weights; the projections that write into the residual stream are scaled down by
    sqrt(2 * n_layers) so the stream's variance does not grow with depth."""
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue  # norm gains keep their ones
        scale = (2 * n_layers) ** -0.5 if name.endswith(("wo.weight", "w2.weight")) else 1.0
        nn.init.normal_(p, mean=0.0, std=std * scale)
