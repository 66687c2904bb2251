"""Attention masks defined once, run two ways.

A mask is a `mask_mod(b, h, q, kv) -> bool` function over batch, head, query and key indices, the form
FlexAttention takes. The SDPA path evaluates the same function on broadcast index grids to get a dense
boolean mask (any device, any PyTorch); the flex path turns it into a block mask, whose empty blocks
are skipped (GPU, or CPU through torch.compile). Neither path is a hard dependency of the other.
"""

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Implementation = Literal["sdpa", "flex"]


def build_mask(mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device: torch.device, implementation: Implementation):
    """The mask attention() takes: a dense [B, 1, Lq, Lk] bool tensor (sdpa) or a BlockMask (flex)."""
    if implementation == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=device)
    b = torch.arange(batch, device=device)[:, None, None, None]
    q = torch.arange(q_len, device=device)[None, None, :, None]
    kv = torch.arange(kv_len, device=device)[None, None, None, :]
    return mask_mod(b, None, q, kv).expand(batch, 1, q_len, kv_len)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """q [B, H, Lq, D], k and v [B, H, Lk, D] under a mask from build_mask (or a dense bool tensor)."""
    if isinstance(mask, torch.Tensor) or mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=mask)


def causal_documents(doc_ids: torch.Tensor, window: int | None = None) -> MaskMod:
    """Self-attention over a sequence: earlier-or-same position, same document, within the window."""

    def mask_mod(b, h, q, kv):
        allowed = (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])
        return allowed & (q - kv < window) if window is not None else allowed

    return mask_mod


def queries_own_keys(query_group: torch.Tensor, key_group: torch.Tensor, queries_per_group: int = 1,
                     keys_per_group: int = 1) -> MaskMod:
    """Cross-attention where query q sees key kv when they belong to the same group: query_group [B, Lq']
    and key_group [B, Lk'] number the groups, each spread over queries_per_group or keys_per_group slots."""

    def mask_mod(b, h, q, kv):
        return query_group[b, q // queries_per_group] == key_group[b, kv // keys_per_group]

    return mask_mod
