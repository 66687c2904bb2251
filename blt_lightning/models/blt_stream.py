"""A ByteLatentTransformer fed one document a chunk at a time (for generation, a byte at a time), with
KV caches: the local encoder's and decoder's self-attention keep the keys a next byte may see (those of
the `local_window` - 1 bytes before it), the global transformer those of every patch so far. A byte
then costs one pass of the local models, and a patch one pass of the global model, instead of a pass
of everything over the whole document for every byte.

The logits are those ByteLatentTransformer.forward gives a row holding the document from its start:
- a byte's encoder states depend on the ids up to it, so they are computed once, when it comes;
- a patch's vector (max-pool, then cross-attention over its bytes) is made once its last byte is in,
  and the global model then advances by that patch;
- byte i's decoder reads the global output of the last patch that ends at or before i (see
  decoder_patch_ids): its own patch if byte i + 1 starts the next one, else the one before. Patch starts
  depend on earlier ids only, so the patcher knows whether i + 1 starts a patch before i + 1 is chosen;
  the caller says so (`next_starts`).
Masks are built for the "sdpa" attention whatever the model's config says: all three compute the same.
"""

from itertools import accumulate

import torch

from ..vocab import BOS, EOS, PAD
from .attention import ReadGroupSlots, SlotsReadGroup, build_mask
from .blt import ByteLatentTransformer
from .layers import KVCache, Rope

UNBOUNDED = 2**62  # the window of attention without one: a cache keeps every key


class BLTStream:
    def __init__(self, model: ByteLatentTransformer):
        """An empty stream: the next id fed is the first of a row (a document's BOS)."""
        c = self.config = model.config
        self.model = model
        self.device = model.decoder.output.weight.device
        self.encoder_cache = KVCache.empty(c.encoder_layers, c.local_window or UNBOUNDED)
        self.decoder_cache = KVCache.empty(c.decoder_layers, c.local_window or UNBOUNDED)
        self.global_cache = KVCache.empty(c.global_layers, UNBOUNDED)
        # The ids before the newest, for hash n-grams: PAD before the row starts, as ngram_hashes pads.
        self.ngram_context = torch.full((max(c.ngram_sizes, default=1) - 1,), PAD, dtype=torch.long, device=self.device)
        # The states of the bytes of the patch not yet complete, in each encoder pooling layer: [1, n, d_enc]
        # tensors as they came (joined when the patch completes), and n in all.
        self.open_patch: list[list[torch.Tensor]] = [[] for _ in model.encoder.pooling_layers]
        self.open_bytes = 0
        # What the decoder's cross-attentions read of the last complete patch (its global output's k slots):
        # per cross-attention, keys and values [1, H, k, head_dim], made once per patch.
        self.latest_slot_keys = None
        self.ended = False

    @torch.inference_mode()
    def feed(self, ids: list[int], starts: list[bool], next_starts: bool) -> torch.Tensor:
        """Next-byte logits [L, VOCAB_SIZE] for the next L ids of the document. starts: which of them start
        a patch; next_starts: whether the id after them will (then their last patch is complete). EOS
        completes its patch: the document ends there."""
        if not ids or self.ended or EOS in ids[:-1] or BOS in (ids[1:] if self.encoder_cache.length == 0 else ids):
            raise ValueError("a stream holds one document: BOS only first, nothing after EOS")
        if not (starts[0] or self.open_bytes):
            raise ValueError("the first id after a complete patch starts a patch")
        self.ended = ids[-1] == EOS
        ends = starts[1:] + [next_starts or self.ended]  # each id is the last of its patch
        fed = self.encoder_cache.length  # ids fed so far (the decoder's cache holds as many)
        positions = torch.arange(fed, fed + len(ids), device=self.device)
        local_mask = self.encoder_cache.mask(positions)
        rope = self.model.encoder.rope(positions)
        byte_states, pooling_states = self._encode(torch.tensor(ids, device=self.device), local_mask, rope)
        patch_vectors = self._complete_patches(pooling_states, starts, ends)  # [1, C, k * d_enc]
        global_out = self._global(patch_vectors) if patch_vectors is not None else None  # [1, C, d_glob]
        if rope.cos.shape[-1] != self.config.decoder_dim // self.config.decoder_heads:  # else the same tables
            rope = self.model.decoder.rope(positions)
        logits = self._decode(byte_states, global_out, ends, local_mask, rope)
        for cache in (self.encoder_cache, self.decoder_cache):
            cache.advance(len(ids))
        return logits

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor | None,
                rope: Rope) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final byte states [1, L, d_enc], and the states of the pooling layers."""
        encoder = self.model.encoder
        x = encoder.tok_embeddings(ids)[None]
        if encoder.ngram_embeddings is not None:
            window = torch.cat([self.ngram_context, ids])
            x = x + encoder.ngram_embeddings(window[None])[:, len(self.ngram_context) :]
            self.ngram_context = window[len(window) - len(self.ngram_context) :]
        pooling_states = []
        for i, layer in enumerate(encoder.layers):
            x = layer(x, mask, rope, self.encoder_cache, i)
            if i in encoder.pooling_layers:
                pooling_states.append(x)
        return x, pooling_states

    def _complete_patches(self, pooling_states: list[torch.Tensor], starts: list[bool],
                          ends: list[bool]) -> torch.Tensor | None:
        """Patch vectors [1, C, k * d_enc] of the C patches this chunk completes (None if none), as
        LocalEncoder makes them; the bytes after the last complete patch stay open."""
        encoder, c = self.model.encoder, self.config
        n_open, n_patches = self.open_bytes, sum(ends)
        if not n_patches:
            for held, new in zip(self.open_patch, pooling_states):
                held.append(new)
            self.open_bytes += len(ends)
            return None
        states = [torch.cat([*held, new], dim=1) for held, new in zip(self.open_patch, pooling_states)]
        n_closed = n_open + len(ends) - ends[::-1].index(True)  # bytes of complete patches
        self.open_bytes = states[0].shape[1] - n_closed
        self.open_patch = [[s[:, n_closed:]] if self.open_bytes else [] for s in states]
        # Patch index of each byte of the complete patches: the open patch (its start fed earlier) is 0.
        patch_starts = ([True] + [False] * (n_open - 1) if n_open else []) + starts
        patch_ids = [n - 1 for n in accumulate(map(int, patch_starts[:n_closed]))]
        patch_ids = torch.tensor(patch_ids, device=self.device)[None]  # [1, n_closed]
        k = c.cross_attn_k
        keyless = torch.zeros(1, n_patches, dtype=torch.bool, device=self.device)
        cross_mask = build_mask(SlotsReadGroup(patch_ids, k, keyless), 1, n_patches * k, n_closed, self.device, "sdpa")
        slots = encoder.patch_slots([s[:, :n_closed] for s in states], patch_ids, n_patches, cross_mask)
        return slots.reshape(1, n_patches, k * c.encoder_dim)

    def _global(self, patch_vectors: torch.Tensor) -> torch.Tensor:
        """The global model advanced by C new patches: their outputs [1, C, d_glob]."""
        transformer = self.model.global_transformer
        h = transformer.project_in(patch_vectors)
        done = self.global_cache.length  # complete patches run through the global model so far
        positions = torch.arange(done, done + h.shape[1], device=self.device)
        mask, rope = self.global_cache.mask(positions), transformer.rope(positions)
        for i, layer in enumerate(transformer.layers):
            h = layer(h, mask, rope, self.global_cache, i)
        self.global_cache.advance(h.shape[1])
        return h

    def _decode(self, byte_states: torch.Tensor, global_out: torch.Tensor | None, ends: list[bool],
                mask: torch.Tensor | None, rope: Rope) -> torch.Tensor:
        """Logits [L, VOCAB_SIZE]: each byte reads the last patch complete at it (one of the new ones or,
        before the first of them, the latest of an earlier chunk)."""
        decoder, k = self.model.decoder, self.config.cross_attn_k
        held = self.latest_slot_keys
        h = decoder.project_in(byte_states)
        if global_out is None:  # every byte reads the latest patch (always so for most bytes generated)
            return decoder.decode(h, held, None, mask, rope, self.decoder_cache)[0]
        # Per cross-attention, keys and values [1, H, T * k, head_dim] of the T patches the bytes may read.
        new = decoder.slot_keys(global_out)
        keys = new if held is None else [(torch.cat([hk, nk], dim=2), torch.cat([hv, nv], dim=2))
                                         for (hk, hv), (nk, nv) in zip(held, new)]
        self.latest_slot_keys = [(keys_[:, :, -k:], values[:, :, -k:]) for keys_, values in keys]
        reads = [n - (0 if held else 1) for n in accumulate(map(int, ends))]  # the patch of keys each byte reads
        if reads[0] == reads[-1]:  # one patch for all (always so a byte at a time): its k keys, no mask
            first, last = reads[0] * k, (reads[0] + 1) * k
            keys, cross_mask = [(keys_[:, :, first:last], values[:, :, first:last]) for keys_, values in keys], None
        else:
            reads = torch.tensor(reads, device=self.device)[None]
            n_keys = keys[0][0].shape[2]
            cross_mask = build_mask(ReadGroupSlots(reads, k), 1, reads.shape[1], n_keys, self.device, "sdpa")
        return decoder.decode(h, keys, cross_mask, mask, rope, self.decoder_cache)[0]
