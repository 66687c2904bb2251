"""The Byte Latent Transformer (BLT_SPEC section 4): a local encoder turns bytes into patch vectors, a
global latent transformer runs over patches, a local decoder turns its outputs back into next-byte
logits. Patches come from outside (blt_lightning.patcher); this file only needs their ids.

Shapes: B rows, L bytes, P patches (padded to the row with most), k = cross_attn_k query slots per
patch; d_enc, d_glob, d_dec the widths of the three models.

The parameters keep the reference's structure, so released checkpoints fit. Names here (with blocks' parts
separate, as layers.stacked_as_parts gives them), then in the Hugging Face port (BltForCausalLM; prefix
`model.`, layer numbers as N):
    encoder.tok_embeddings                      local_encoder.embed_tokens
    encoder.ngram_embeddings.embeddings.I       encoder_hash_tok_embedding (one table: rows I*V .. (I+1)*V)
    encoder.layers.N.attention.w{q,k,v,o}       local_encoder.layers.N.self_attn.{q,k,v,o}_proj
    encoder.layers.N.feed_forward.w{1,3,2}      local_encoder.layers.N.mlp.{gate,up,down}_proj
    encoder.layers.N.{attention,ffn}_norm       local_encoder.layers.N.{input,post_attention}_layernorm
    encoder.patch_projection                    local_encoder.patch_embedding_projection
    encoder.cross_attn.N.w{q,k,v,o}             local_encoder.cross_attn_layers.N.{q,k,v,o}_proj
    encoder.cross_attn.N.{query,kv}_norm        local_encoder.cross_attn_layers.N.{q,k}_norm
    global_transformer.layers.N.*               global_transformer.layers.N.* (as the encoder's layers)
    decoder.patch_projection                    local_decoder.patch_embedding_projection
    decoder.cross_attn.N.*, decoder.layers.N.*  local_decoder.cross_attn_layers.N.*, local_decoder.layers.N.*
    decoder.norm, decoder.output                local_decoder.norm, lm_head (top level)
RoPE is applied in the rotate-half form; a port that rotates interleaved pairs needs its q/k rows permuted.
In the modules and their state dicts a transformer block's wq, wk, wv are one stacked weight, attention.wqkv,
and w1, w3 are feed_forward.w13 (layers.STACKED_PARTS); blocks also load state dicts with the parts.
"""

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..patching import Patches
from ..vocab import VOCAB_SIZE, document_ids
from .attention import ReadGroupSlots, SlotsReadGroup, attention_rows, build_mask, causal_documents
from .layers import KVCache, Linear, Rope, TransformerBlock, init_weights, swiglu_hidden
from .lean_backward import RMSNorm, keeping_recipes

HASH_PRIMES = (1000000007, 5915587277)  # the reference's first two hash functions


@dataclass(frozen=True)
class BLTConfig:
    """Shape of a Byte Latent Transformer. The defaults are the released BLT-1B's."""

    encoder_dim: int = 1024
    """Width of the local encoder."""
    encoder_layers: int = 1
    """Transformer blocks of the local encoder."""
    encoder_heads: int = 16
    """Attention heads of the local encoder (and of its cross-attention)."""
    global_dim: int = 2048
    """Width of the global latent transformer."""
    global_layers: int = 25
    """Transformer blocks of the global latent transformer."""
    global_heads: int = 16
    """Attention heads of the global latent transformer."""
    decoder_dim: int = 1024
    """Width of the local decoder."""
    decoder_layers: int = 9
    """Transformer blocks of the local decoder."""
    decoder_heads: int = 16
    """Attention heads of the local decoder (and of its cross-attention)."""
    local_window: int | None = 512
    """Sliding window of the local models' self-attention over bytes (None: whole documents)."""
    cross_attn_k: int = 2
    """Query slots per patch: a patch vector is cross_attn_k * encoder_dim wide."""
    encoder_cross_attn_all_layers: bool = False
    """Pool bytes into patches after every encoder layer (else after the last only)."""
    decoder_cross_attn_all_layers: bool = True
    """Read the global outputs in every decoder layer (else in the first only)."""
    ngram_sizes: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    """Hash n-gram embeddings: the n bytes ending at each position, for each n here (empty: none)."""
    ngram_table_size: int = 500_002
    """Rows of each hash n-gram embedding table."""
    hash_functions: int = 1
    """Hash functions per n-gram size (at most 2)."""
    rope_theta: float = 500_000.0
    """Base of the rotary position embeddings (over bytes locally, over patches globally)."""
    norm_eps: float = 1e-5
    """Epsilon of the RMSNorms."""
    ffn_multiple_of: int = 256
    """SwiGLU hidden widths are 2/3 of 4 * dim rounded up to a multiple of this, unless set below."""
    encoder_ffn_hidden: int | None = None
    """SwiGLU hidden width of the encoder (BLT-1B: 2816)."""
    global_ffn_hidden: int | None = None
    """SwiGLU hidden width of the global transformer (BLT-1B: 5632)."""
    decoder_ffn_hidden: int | None = None
    """SwiGLU hidden width of the decoder (BLT-1B: 2816)."""
    attention: Literal["sdpa", "dense", "flex"] = "sdpa"
    """sdpa: SDPA a block of queries at a time, cross-attention by per-patch gathers; cost linear in the row
    (with a window), any device. dense: SDPA over dense masks, quadratic in the row (the reference the others
    match). flex: FlexAttention block masks, compiled (GPU; on a CPU forward only). See models/attention.py."""
    doubled_cross_attn_residual: bool = False
    """Add the cross-attention input twice (x + x + attn), as the released checkpoints were trained."""

    def __post_init__(self):
        if self.hash_functions > len(HASH_PRIMES):
            raise ValueError(f"at most {len(HASH_PRIMES)} hash functions")

    # What the shape implies, stated once (for the model, its FLOPs and the Hugging Face format alike)

    @property
    def encoder_hidden(self) -> int:
        """SwiGLU hidden width of the encoder's blocks: encoder_ffn_hidden, or derived from its width."""
        return self.encoder_ffn_hidden or swiglu_hidden(self.encoder_dim, self.ffn_multiple_of)

    @property
    def global_hidden(self) -> int:
        """SwiGLU hidden width of the global transformer's blocks: global_ffn_hidden, or derived from its width."""
        return self.global_ffn_hidden or swiglu_hidden(self.global_dim, self.ffn_multiple_of)

    @property
    def decoder_hidden(self) -> int:
        """SwiGLU hidden width of the decoder's blocks: decoder_ffn_hidden, or derived from its width."""
        return self.decoder_ffn_hidden or swiglu_hidden(self.decoder_dim, self.ffn_multiple_of)

    @property
    def encoder_cross_attns(self) -> int:
        """Cross-attentions that pool bytes into patch slots: after every encoder layer, or after the last."""
        return self.encoder_layers if self.encoder_cross_attn_all_layers else 1

    @property
    def decoder_cross_attns(self) -> int:
        """Cross-attentions that read the patch slots: before every decoder layer, or before the first."""
        return self.decoder_layers if self.decoder_cross_attn_all_layers else 1


def ngram_hashes(ids: torch.Tensor, keys: tuple[tuple[int, int], ...], table_size: int,
                 doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, len(keys)] table rows, for each (prime, n) of keys, of the n ids ending at each position
    (left-padded with 0): the reference's sum_j id_j * prime^j over the window (j = 0 the oldest), in
    wrapping int64, modulo table_size. All sizes at once: one window of the longest, its older ids
    weighted 0 for shorter n-grams (a wrapping sum is the same in any order).

    With doc_ids [B, L], ids of another document count as the padding 0, as at a row's start: a document's
    n-grams, like its attention, never reach into the document before it in a packed row (the reference
    hashes across them), so a document's logits are those it has alone, or when generated."""
    longest = max(n for _, n in keys)
    windows = F.pad(ids, (longest - 1, 0), value=0).unfold(-1, longest, 1)  # [B, L, longest], oldest first
    if doc_ids is not None:
        window_docs = F.pad(doc_ids, (longest - 1, 0), value=-1).unfold(-1, longest, 1)
        windows = windows * (window_docs == doc_ids[..., None])
    powers = _window_powers(keys, ids.device)  # [len(keys), longest]
    return (windows.long()[..., None, :] * powers).sum(-1) % table_size


@functools.cache
def _window_powers(keys: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """Per (prime, n): 0 for the ids before its n-gram, then prime^0 .. prime^(n - 1) as int64 multiplication
    gives them, wrapping around (as in the reference). Made once per device."""
    longest = max(n for _, n in keys)
    wrapped = [[0] * (longest - n) + [pow(prime, j, 2**64) for j in range(n)] for prime, n in keys]
    with torch.inference_mode(False):  # kept for training too
        return torch.tensor([[p - 2**64 if p >= 2**63 else p for p in row] for row in wrapped], device=device)


class HashNgramEmbedding(nn.Module):
    """Sum of one embedding per (hash function, n-gram size), looked up by hashed n-grams."""

    def __init__(self, dim: int, sizes: tuple[int, ...], table_size: int, functions: int):
        super().__init__()
        self.keys = tuple((prime, n) for prime in HASH_PRIMES[:functions] for n in sizes)  # the reference's order
        self.table_size = table_size
        self.embeddings = nn.ModuleList(nn.Embedding(table_size, dim) for _ in self.keys)

    def forward(self, ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, dim] of ids [B, L] (of one document, or of the documents doc_ids says)."""
        rows = ngram_hashes(ids, self.keys, self.table_size, doc_ids)  # [B, L, embeddings]
        return functools.reduce(torch.add, (embedding(rows[..., i]) for i, embedding in enumerate(self.embeddings)))


class CrossAttention(nn.Module):
    """Queries x read keys and values kv (RMSNorm on both, no positions); returns the update only."""

    def __init__(self, dim: int, n_heads: int, norm_eps: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.query_norm = RMSNorm(dim, eps=norm_eps)
        self.kv_norm = RMSNorm(dim, eps=norm_eps)
        self.wq, self.wk, self.wv, self.wo = (Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask) -> torch.Tensor:
        return self.attend(x, self.keys(kv), mask)

    def keys(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, Lk, head_dim] of kv [B, Lk, dim]."""
        B, Lk, _ = kv.shape
        kv = self.kv_norm(kv)
        k, v = (w(kv).view(B, Lk, self.n_heads, self.head_dim).transpose(1, 2) for w in (self.wk, self.wv))
        return k, v

    def attend(self, x: torch.Tensor, keys: tuple[torch.Tensor, torch.Tensor], mask) -> torch.Tensor:
        """The update of queries x [B, Lq, dim] reading `keys` (keys and values) under mask."""
        B, Lq, D = x.shape
        q = self.wq(self.query_norm(x)).view(B, Lq, self.n_heads, self.head_dim).transpose(1, 2)
        return self.wo(attention_rows(q, *keys, mask))


def _blocks(dim: int, n_layers: int, n_heads: int, hidden: int, config: BLTConfig) -> nn.ModuleList:
    return nn.ModuleList(TransformerBlock(dim, n_heads, hidden, config.norm_eps) for _ in range(n_layers))


class LocalEncoder(nn.Module):
    def __init__(self, config: BLTConfig):
        super().__init__()
        d, k = config.encoder_dim, config.cross_attn_k
        self.config = config
        self.tok_embeddings = nn.Embedding(VOCAB_SIZE, d)
        self.ngram_embeddings = (HashNgramEmbedding(d, config.ngram_sizes, config.ngram_table_size,
                                                    config.hash_functions)
                                 if config.ngram_sizes else None)
        self.layers = _blocks(d, config.encoder_layers, config.encoder_heads, config.encoder_hidden, config)
        self.patch_projection = Linear(d, d * k) if k > 1 else None
        self.cross_attn = nn.ModuleList(CrossAttention(d, config.encoder_heads, config.norm_eps)
                                        for _ in range(config.encoder_cross_attns))

    def forward(self, ids: torch.Tensor, doc_ids: torch.Tensor, self_mask,
                patches: Patches) -> tuple[torch.Tensor, torch.Tensor]:
        """Byte states [B, L, d_enc] and patch vectors [B, P, k * d_enc]."""
        B, L = ids.shape
        P, k, d = patches.lengths.shape[1], self.config.cross_attn_k, self.config.encoder_dim
        x = self.tok_embeddings(ids)
        if self.ngram_embeddings is not None:
            x = x + self.ngram_embeddings(ids, doc_ids)
        # Slot q of patch q // k reads that patch's bytes (padding patches have none: see SlotsReadGroup).
        cross_mask = build_mask(SlotsReadGroup(patches.patch_ids, k, ~patches.mask), B, P * k, L, ids.device,
                                self.config.attention)
        rope = self.rope(torch.arange(L, device=ids.device))
        pooling_states = []
        for i, layer in enumerate(self.layers):
            x = layer(x, self_mask, rope)
            if i in self.pooling_layers:
                pooling_states.append(x)
        return x, self.patch_slots(pooling_states, patches.patch_ids, P, cross_mask).reshape(B, P, k * d)

    def rope(self, positions: torch.Tensor) -> Rope:
        return Rope.at(positions, self.config.encoder_dim // self.config.encoder_heads, self.config.rope_theta)

    @property
    def pooling_layers(self) -> list[int]:
        """The layers whose byte states the patches read (a cross-attention after each)."""
        last = len(self.layers) - 1
        return list(range(last + 1)) if self.config.encoder_cross_attn_all_layers else [last]

    def patch_slots(self, pooling_states: list[torch.Tensor], patch_ids: torch.Tensor, n_patches: int,
                    cross_mask) -> torch.Tensor:
        """[B, P * k, d]: the patches' query slots. The first pooling layer's states [B, L, d] of each patch's
        bytes are max-pooled (and projected to k slots), then each pooling layer's are cross-attended."""
        B, _, d = pooling_states[0].shape
        pooled = _max_pool(pooling_states[0], patch_ids, n_patches)  # [B, P, d]
        if self.patch_projection is not None:
            pooled = in_stream_dtype(self.patch_projection(pooled), pooled)  # [B, P, k * d]
        slots = pooled.reshape(B, n_patches * self.config.cross_attn_k, d)
        for cross_attn, x in zip(self.cross_attn, pooling_states):
            slots = (2 * slots if self.config.doubled_cross_attn_residual else slots) + cross_attn(slots, x, cross_mask)
        return slots


class GlobalTransformer(nn.Module):
    def __init__(self, config: BLTConfig):
        super().__init__()
        width_in = config.cross_attn_k * config.encoder_dim
        self.config = config
        self.input_projection = Linear(width_in, config.global_dim) if width_in != config.global_dim else None
        self.layers = _blocks(config.global_dim, config.global_layers, config.global_heads, config.global_hidden, config)

    def forward(self, patch_vectors: torch.Tensor, patch_doc_ids: torch.Tensor) -> torch.Tensor:
        """[B, P, d_glob]: patch p sees patches <= p of its own document."""
        B, P, _ = patch_vectors.shape
        h = self.project_in(patch_vectors)
        mask = build_mask(causal_documents(patch_doc_ids), B, P, P, h.device, self.config.attention)
        rope = self.rope(torch.arange(P, device=h.device))
        for layer in self.layers:
            h = layer(h, mask, rope)
        return h

    def project_in(self, patch_vectors: torch.Tensor) -> torch.Tensor:
        """The residual stream [B, P, d_glob] that the patch vectors [B, P, k * d_enc] start."""
        if self.input_projection is None:
            return patch_vectors
        return in_stream_dtype(self.input_projection(patch_vectors), patch_vectors)

    def rope(self, positions: torch.Tensor) -> Rope:
        return Rope.at(positions, self.config.global_dim // self.config.global_heads, self.config.rope_theta)


class LocalDecoder(nn.Module):
    def __init__(self, config: BLTConfig):
        super().__init__()
        d, k = config.decoder_dim, config.cross_attn_k
        self.config = config
        self.input_projection = Linear(config.encoder_dim, d) if config.encoder_dim != d else None
        self.patch_projection = Linear(config.global_dim, d * k)  # present even when the widths match, as released
        self.cross_attn = nn.ModuleList(CrossAttention(d, config.decoder_heads, config.norm_eps)
                                        for _ in range(config.decoder_cross_attns))
        self.layers = _blocks(d, config.decoder_layers, config.decoder_heads, config.decoder_hidden, config)
        self.norm = RMSNorm(d, eps=config.norm_eps)
        self.output = Linear(d, VOCAB_SIZE)

    def forward(self, byte_states: torch.Tensor, global_out: torch.Tensor, decoder_patch_ids: torch.Tensor,
                self_mask) -> torch.Tensor:
        """Next-byte logits [B, L, VOCAB_SIZE]; byte i reads the k slots of global output decoder_patch_ids[i]."""
        B, L, _ = byte_states.shape
        P, k = global_out.shape[1], self.config.cross_attn_k
        h = self.project_in(byte_states)
        cross_mask = build_mask(ReadGroupSlots(decoder_patch_ids, k), B, L, P * k, h.device, self.config.attention)
        return self.decode(h, self.slot_keys(global_out), cross_mask, self_mask,
                           self.rope(torch.arange(L, device=h.device)))

    def project_in(self, byte_states: torch.Tensor) -> torch.Tensor:
        """The residual stream [B, L, d_dec] that the encoder's byte states [B, L, d_enc] start."""
        if self.input_projection is None:
            return byte_states
        return in_stream_dtype(self.input_projection(byte_states), byte_states)

    def rope(self, positions: torch.Tensor) -> Rope:
        return Rope.at(positions, self.config.decoder_dim // self.config.decoder_heads, self.config.rope_theta)

    def slot_keys(self, global_out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What each cross-attention reads of global outputs [B, P, d_glob]: the keys and values of their
        slots, k a patch ([B, H, P * k, head_dim] each)."""
        B, P, _ = global_out.shape
        slots = in_stream_dtype(self.patch_projection(global_out), global_out)
        slots = slots.reshape(B, P * self.config.cross_attn_k, self.config.decoder_dim)
        return [cross_attn.keys(slots) for cross_attn in self.cross_attn]

    def decode(self, h: torch.Tensor, slot_keys: list[tuple[torch.Tensor, torch.Tensor]], cross_mask, self_mask,
               rope: Rope, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, L, VOCAB_SIZE] of byte states h [B, L, d_dec] (projected) at the positions of `rope`,
        reading slot_keys (of slot_keys()) under cross_mask; with a cache (generation), the self-attention
        continues what it holds."""
        for i, layer in enumerate(self.layers):
            if i < len(self.cross_attn):  # before every layer, or (decoder_cross_attn_all_layers off) the first
                update = self.cross_attn[i].attend(h, slot_keys[i], cross_mask)
                h = (2 * h if self.config.doubled_cross_attn_residual else h) + update
            h = layer(h, self_mask, rope, cache, i)
        return self.output(self.norm(h))


class ByteLatentTransformer(nn.Module):
    def __init__(self, config: BLTConfig):
        super().__init__()
        self.config = config
        self.encoder = LocalEncoder(config)
        self.global_transformer = GlobalTransformer(config)
        self.decoder = LocalDecoder(config)
        init_weights(self, config.encoder_layers + config.global_layers + config.decoder_layers)

    def forward(self, ids: torch.Tensor, patches: Patches, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Next-byte logits [B, L, VOCAB_SIZE] for ids [B, L] cut into `patches`; position t depends on
        ids[:, :t+1] only (given patches whose starts up to t depend only on them, as the patcher's do)."""
        B, L = ids.shape
        doc_ids = document_ids(ids) if doc_ids is None else doc_ids
        self_mask = build_mask(causal_documents(doc_ids, self.config.local_window), B, L, L, ids.device,
                               self.config.attention)
        with keeping_recipes():  # backward makes norms' outputs and copies of keys again (lean_backward.py)
            # [B, L, d_enc], [B, P, k * d_enc]
            byte_states, patch_vectors = self.encoder(ids, doc_ids, self_mask, patches)
            patch_doc_ids = patch_document_ids(doc_ids, patches)
            global_out = self.global_transformer(patch_vectors, patch_doc_ids)  # [B, P, d_glob]
            return self.decoder(byte_states, global_out, decoder_patch_ids(patches), self_mask)

    def byte_level_blocks(self) -> list[TransformerBlock]:
        """The blocks that run over bytes (the local encoder's and decoder's): at long rows, most activations."""
        return [*self.encoder.layers, *self.decoder.layers]


def patch_document_ids(doc_ids: torch.Tensor, patches: Patches) -> torch.Tensor:
    """[B, P] the document of each patch (that of its first byte); -1 for padding patches."""
    B, P = patches.lengths.shape
    first = torch.full((B, P), -1, dtype=doc_ids.dtype, device=doc_ids.device)
    return first.scatter_reduce(1, patches.patch_ids, doc_ids, "amin", include_self=False)


def decoder_patch_ids(patches: Patches) -> torch.Tensor:
    """[B, L] the global output each byte reads: byte i predicts byte i + 1, so it may read patches that
    end at or before i. It reads the last of them: the patch before the one holding i + 1. Past the row's
    end, the id i + 1 would begin a new patch if patches.next_starts says so (after EOS it does), else
    continue i's (as in generation, where that is known before i + 1 is drawn)."""
    after_row = patches.patch_ids[:, -1:] + patches.next_starts[:, None].long()
    next_patch = torch.cat([patches.patch_ids[:, 1:], after_row], dim=1)
    return next_patch - 1


def _max_pool(x: torch.Tensor, patch_ids: torch.Tensor, n_patches: int) -> torch.Tensor:
    """[B, P, d] elementwise max of each patch's byte states (0 for padding patches, which have none)."""
    B, L, d = x.shape
    pooled = torch.full((B, n_patches, d), float("-inf"), dtype=x.dtype, device=x.device)
    pooled = pooled.scatter_reduce(1, patch_ids[..., None].expand(B, L, d), x, "amax", include_self=True)
    return pooled.masked_fill(pooled == float("-inf"), 0.0)


def in_stream_dtype(projected: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
    """A projection of one stream that starts another (or that another reads), in the first stream's dtype:
    that of the embeddings the streams start from. Under autocast (bf16-mixed) a projection computes in
    bf16; a residual stream started there would stay bf16 through every addition after it, rounding each
    layer's update to bf16 where the byte streams add in float32, and a norm of bf16 under float32 weights
    misses its fused kernel."""
    return projected.to(stream.dtype)
