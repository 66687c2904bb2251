"""The entropy model (BLT_SPEC section 2): a small causal byte LM whose next-byte entropies decide
where BLT's patches begin. Trained first (stage one), then frozen."""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..vocab import VOCAB_SIZE, document_ids
from .attention import build_mask, causal_documents
from .layers import KVCache, Linear, Rope, TransformerBlock, init_weights, swiglu_hidden
from .lean_backward import RMSNorm, keeping_recipes


@dataclass(frozen=True)
class EntropyModelConfig:
    """Shape of the entropy model. The defaults are the reference's (BLT-1B's patcher)."""

    dim: int = 768
    """Width of the residual stream."""
    n_layers: int = 14
    """Transformer blocks."""
    n_heads: int = 12
    """Attention heads; dim must be a multiple of it."""
    sliding_window: int | None = 512
    """Keys a query sees, itself included (None: all earlier bytes of its document)."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding."""
    norm_eps: float = 1e-5
    """Epsilon of the RMSNorms."""
    ffn_multiple_of: int = 256
    """The SwiGLU hidden width (2/3 of 4 * dim) is rounded up to a multiple of this."""

    @property
    def ffn_hidden(self) -> int:
        return swiglu_hidden(self.dim, self.ffn_multiple_of)


class EntropyModel(nn.Module):
    def __init__(self, config: EntropyModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(VOCAB_SIZE, config.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(config.dim, config.n_heads, config.ffn_hidden, config.norm_eps)
            for _ in range(config.n_layers)
        )
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = Linear(config.dim, VOCAB_SIZE)
        init_weights(self, config.n_layers)

    def forward(self, ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                window: int | None = None) -> torch.Tensor:
        """Next-byte logits [B, L, VOCAB_SIZE] for ids [B, L]; position t sees ids[:, :t+1] of its own
        document (doc_ids, [B, L], default: counted from BOS markers), within the sliding window
        (`window` overrides the configured one)."""
        if doc_ids is None:
            doc_ids = document_ids(ids)
        B, L = ids.shape
        mask = build_mask(causal_documents(doc_ids, window or self.config.sliding_window), B, L, L, ids.device, "sdpa")
        rope = self.rope(torch.arange(L, device=ids.device))
        with keeping_recipes():  # backward makes norms' outputs and copies of keys again (lean_backward.py)
            x = self.tok_embeddings(ids)  # [B, L, dim]
            for layer in self.layers:
                x = layer(x, mask, rope)
            return self.output(self.norm(x))

    def rope(self, positions: torch.Tensor) -> Rope:
        return Rope.at(positions, self.config.dim // self.config.n_heads, self.config.rope_theta)

    def new_cache(self, window: int | None = None) -> KVCache:
        """An empty cache to stream one document through `forward_cached`, a chunk at a time."""
        window = window or self.config.sliding_window
        if window is None:
            raise ValueError("streaming needs an attention window: the model's sliding window or its context length")
        return KVCache.empty(len(self.layers), window)

    def forward_cached(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, L, VOCAB_SIZE] for the next chunk ids [B, L] of B document streams, continuing where
        the cache left off: the same as one pass over the whole stream with window `cache.window`."""
        positions = torch.arange(cache.length, cache.length + ids.shape[1], device=ids.device)
        mask = cache.mask(positions)
        x, rope = self.tok_embeddings(ids), self.rope(positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, rope, cache, i)
        cache.advance(ids.shape[1])
        return self.output(self.norm(x))

    @torch.no_grad()
    def entropies(self, ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                  window: int | None = None) -> torch.Tensor:
        """H(t) = -sum_v p(v | ids[:t+1]) ln p(v | ids[:t+1]) in nats, [B, L], float32: the uncertainty
        about the byte after position t. Between 0 and ln(VOCAB_SIZE). In the model's own precision under any
        autocast (a bf16-mixed trainer's): patches then do not depend on the precision a run trains in."""
        with without_autocast(ids.device):
            return entropy_of(self(ids, doc_ids, window))

    @torch.no_grad()
    def document_entropies(self, ids: torch.Tensor, window: int, chunk: int | None = None) -> torch.Tensor:
        """Entropies [L] of one document's ids [L] of any length, streamed in chunks through a KV cache:
        every position sees itself and up to `window` - 1 earlier ids at every layer, as in one pass over all
        of it.
        A chunk attends over itself and the window before it, so chunks of one window (the default)
        waste at most half the attention work."""
        cache = self.new_cache(window)
        with without_autocast(ids.device):  # as entropies()
            return torch.cat([entropy_of(self.forward_cached(part[None], cache))[0]
                              for part in ids.split(chunk or window)])

    def byte_level_blocks(self) -> list[TransformerBlock]:
        """The blocks that run over bytes: all of them."""
        return list(self.layers)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.tok_embeddings.weight.numel()


def without_autocast(device: torch.device):
    """A context with autocast off on `device` (nothing to turn off where it has none, as on "meta")."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the softmax of logits [..., V], float32, clamped to [0, ln V] against rounding."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return (-(logp.exp() * logp).sum(-1)).clamp(0.0, math.log(logits.shape[-1]))
