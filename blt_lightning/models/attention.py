"""Attention masks defined once, run three ways.

A mask is a `mask_mod(b, h, q, kv) -> bool` function over batch, head, query and key indices, the form
FlexAttention takes. build_mask turns one into what attention() runs:

- dense: the function evaluated on broadcast index grids, a [B, 1, Lq, Lk] boolean mask for SDPA. Any
  device; cost and memory grow with Lq * Lk. The simple reference the other two must agree with.
- sdpa: as dense, but using what the masks below say of their structure to skip the parts of the grid
  that are all False. Self-attention runs a block of queries at a time: with a sliding window W against
  the keys of the few blocks it reaches (cost ~ L * (W + block), not L^2), without one against the keys
  up to its block's end; the patch cross-attentions gather the few keys each query may read. The same
  results as dense, any device. (On the CPU the blocks run as one autograd function over torch's flash kernel,
  _CPUBlockAttention; elsewhere, and compiled, as SDPA calls composed through autograd.)
- flex: a FlexAttention block mask, whose empty blocks a compiled kernel skips (GPU; on a CPU it runs
  eagerly, forward only, for tests and references).

Each mask below is a small dataclass that is its own mask_mod, so the structure sdpa exploits and the
function dense and flex evaluate cannot drift apart.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .lean_backward import remade

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Implementation = Literal["sdpa", "dense", "flex"]


@dataclass
class CausalDocuments:
    """Self-attention over a sequence: earlier-or-same position, same document, within the window."""

    doc_ids: torch.Tensor  # [B, L]
    window: int | None = None  # keys a query sees, itself included (None: its whole document so far)

    def __call__(self, b, h, q, kv):
        allowed = (q >= kv) & (self.doc_ids[b, q] == self.doc_ids[b, kv])
        return allowed & (q - kv < self.window) if self.window is not None else allowed


@dataclass
class SlotsReadGroup:
    """Cross-attention from groups of `slots` queries (query q in group q // slots) to the keys of their
    group (key kv in group key_group[b, kv]): BLT's encoder, where a patch's query slots read its bytes.
    A group in `keyless` has no keys; in dense and flex it reads every key so that its softmax is defined,
    in sdpa its update is zero. Nothing may depend on what such a group reads."""

    key_group: torch.Tensor  # [B, Lk]
    slots: int
    keyless: torch.Tensor  # [B, Lq // slots] bool

    def __call__(self, b, h, q, kv):
        return (self.key_group[b, kv] == q // self.slots) | self.keyless[b, q // self.slots]


@dataclass
class ReadGroupSlots:
    """Cross-attention from queries to groups of `slots` keys (key kv in group kv // slots): query q reads
    the slots of group query_group[b, q] only (none for group -1). BLT's decoder, where a byte reads the k
    slots of one patch."""

    query_group: torch.Tensor  # [B, Lq]
    slots: int

    def __call__(self, b, h, q, kv):
        return self.query_group[b, q] == kv // self.slots


def causal_documents(doc_ids: torch.Tensor, window: int | None = None) -> CausalDocuments:
    """The causal document mask of doc_ids [B, L] (the entropy model's and BLT's self-attention)."""
    return CausalDocuments(doc_ids, window)


# Queries per block. On a 2-core CPU, at a window of 512: 512 took 30% longer; 128 did less work but took
# as long over a whole BLT training step (1 x 8192 bytes) and holds 5 copies of the keys at once (256: 3);
# without a window 256 was the fastest.
BLOCK = 256


@dataclass
class SelfAttentionBlocks:
    """CausalDocuments as sdpa runs it: queries in blocks of `size`, so that blocks of keys no query of a
    block can see are never computed.
    - windowed (where windows_save_work): block i's queries can only see keys of blocks i - back ..
      i, back = ceil((window - 1) / size). allowed [B * n_blocks, 1, size, (back + 1) * size]: SDPA calls
      over several blocks, each against those keys: its own copy of them (made again in backward, not kept),
      or on the CPU, eagerly, an overlapping view of one copy of all the keys.
    - causal: block i's queries see keys of blocks 0 .. i. allowed [B, 1, L, L]: one SDPA call a block,
      over the keys up to its end (about half the work of the whole square on a long row)."""

    allowed: torch.Tensor
    size: int
    windowed: bool
    back: int = 0


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A part of SelfAttentionBlocks.allowed, for one SDPA call, as 0 / -inf in dtype. SDPA would make this of
    a boolean mask itself and keep it for backward; made by remade(), it is kept as its recipe instead."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def build_mask(mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device: torch.device,
               implementation: Implementation):
    """What attention() takes: a dense [B, 1, Lq, Lk] bool tensor (dense), SelfAttentionBlocks or a structured
    cross-attention mask itself (sdpa), or a BlockMask (flex)."""
    if implementation == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=device)
    if implementation == "sdpa" and isinstance(mask_mod, CausalDocuments) and q_len == kv_len:
        if mask_mod.window is not None and windows_save_work(mask_mod.window, q_len):
            return _window_blocks(mask_mod, batch, q_len, device)
        return SelfAttentionBlocks(build_mask(mask_mod, batch, q_len, kv_len, device, "dense"), BLOCK, windowed=False)
    if implementation == "sdpa" and isinstance(mask_mod, (SlotsReadGroup, ReadGroupSlots)):
        return mask_mod  # attention() gathers what each query reads
    b = torch.arange(batch, device=device)[:, None, None, None]
    q = torch.arange(q_len, device=device)[None, None, :, None]
    kv = torch.arange(kv_len, device=device)[None, None, None, :]
    return mask_mod(b, None, q, kv).expand(batch, 1, q_len, kv_len)


def _window_layout(window: int) -> tuple[int, int]:
    """Queries per block under a sliding window, and the blocks before its own that a block reaches back to."""
    size = min(BLOCK, window)
    return size, -(-(window - 1) // size)


def windows_save_work(window: int, length: int) -> bool:
    """Whether, over a row of `length`, window blocks (each block of queries against its own keys and those of
    the `back` blocks before, the row padded to whole blocks) compute fewer query-key scores than causal
    blocks (the queries of block i against the keys up to its end). Where they do not, they would only add
    copies of the keys: on a row of 1,024 at a window of 512, windows make 3,072 scores a query block's
    worth, causal blocks 2,560."""
    size, back = _window_layout(window)
    windowed = -(-length // size) * size * (back + 1) * size
    causal = sum(min(BLOCK, length - start) * min(start + BLOCK, length) for start in range(0, length, BLOCK))
    return windowed < causal


def _window_blocks(mask_mod: CausalDocuments, batch: int, length: int, device: torch.device) -> SelfAttentionBlocks:
    """The mask evaluated where each block's queries meet the keys of its `back` blocks before and its own.
    The row is padded to whole blocks; keys outside it are masked out, and padding queries ask as the
    row's last position (which sees itself), so no query has an empty softmax to turn gradients into NaN."""
    size, back = _window_layout(mask_mod.window)
    n = -(-length // size)
    keys = (back + 1) * size
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    q = torch.arange(n * size, device=device).view(1, n, size, 1)
    kv = torch.arange(n, device=device)[:, None] * size + torch.arange(-back * size, size, device=device)
    kv = kv.view(1, n, 1, keys)
    inside = (kv >= 0) & (kv < length)
    allowed = mask_mod(b, None, q.clamp(max=length - 1), kv.clamp(0, length - 1)) & inside  # [B, n, size, keys]
    return SelfAttentionBlocks(allowed.reshape(batch * n, 1, size, keys), size, windowed=True, back=back)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """q [B, H, Lq, D], k and v [B, H, Lk, D] under a mask from build_mask (or a dense bool tensor)."""
    if isinstance(mask, torch.Tensor) or mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if isinstance(mask, SelfAttentionBlocks):
        B, H, L, D = q.shape
        return attention_rows(q, k, v, mask).view(B, L, H, D).transpose(1, 2)
    if isinstance(mask, SlotsReadGroup):
        return _slots_read_group(q, k, v, mask)
    if isinstance(mask, ReadGroupSlots):
        return _read_group_slots(q, k, v, mask)
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cpu" or torch.compiler.is_compiling():
        # Inside compiled blocks it is compiled with them; on a CPU (no backward there) it runs eagerly.
        return flex_attention(q, k, v, block_mask=mask)
    return _compiled_flex_attention()(q, k, v, block_mask=mask)


def attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """attention() with each query's heads side by side, [B, Lq, H * D]: what an output projection reads.
    That product keeps its input for backward; here it keeps a recipe instead, over the results that the
    attention keeps for itself (SDPA's outputs), or (the CPU kernels) the rows the attention keeps, so that they
    are not kept twice."""
    B, H, Lq, D = q.shape
    if _by_the_cpu_kernel(q, mask):
        if torch.is_autocast_enabled("cpu"):  # autocast casts SDPA's inputs, not those of the kernel's own op
            q, k, v = (x.to(torch.get_autocast_dtype("cpu")) for x in (q, k, v))
        return _CPUBlockAttention.apply(q, k, v, mask)
    if isinstance(mask, SelfAttentionBlocks):
        parts, rows = _attention_in_blocks(q, k, v, mask)
    else:
        parts, rows = (attention(q, k, v, mask),), _rows_along_the_row(B, Lq, H * D)
    return remade(rows, *parts)


@functools.cache
def _compiled_flex_attention() -> Callable:
    """FlexAttention compiled, its kernel skipping the empty blocks of the mask. Run eagerly it makes the whole
    [B, H, Lq, Lk] score matrix (in float32 16 GiB a layer for 8 rows of 8,192 bytes at 8 heads). Rows' patch counts
    vary: after the second shape Dynamo compiles for any length."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


RowsOfParts = Callable[..., torch.Tensor]


def _attention_in_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         blocks: SelfAttentionBlocks) -> tuple[list[torch.Tensor], RowsOfParts]:
    """Self-attention in blocks of queries as SDPA calls: their outputs, and the function that lays them out as
    attention_rows' [B, L, H * D]."""
    return (_window_attention if blocks.windowed else _causal_attention)(q, k, v, blocks)


def _heads_side_by_side(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """SDPA outputs [b, H, l, D] as one [.., l, H, D], joined along `dim` of that: on the CPU their memory is
    already laid out so, and one part is a view."""
    heads = [y.transpose(1, 2) for y in parts]
    return heads[0] if len(heads) == 1 else torch.cat(heads, dim=dim)


def _rows_along_the_row(B: int, L: int, width: int) -> RowsOfParts:
    """The rows [B, L, H * D] of SDPA outputs that follow one another along the row."""
    return lambda *parts: _heads_side_by_side(parts).reshape(B, L, width)


def _rows_of_blocks(B: int, L: int, width: int) -> RowsOfParts:
    """The rows [B, L, H * D] of SDPA outputs over blocks of queries, [blocks, H, S, D] each, whose rows are
    whole blocks in order (the last of each padded): a copy only where the rows were padded."""
    return lambda *parts: _heads_side_by_side(parts, dim=0).reshape(B, -1, width)[:, :L].contiguous()


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      blocks: SelfAttentionBlocks) -> tuple[list[torch.Tensor], RowsOfParts]:
    """Each block of queries [B, H, S, D] against the keys up to its own end."""
    B, H, L, D = q.shape
    S = blocks.size
    parts = [F.scaled_dot_product_attention(
        q[:, :, i : i + S], k[:, :, : i + S], v[:, :, : i + S],
        attn_mask=remade(_additive, blocks.allowed[:, :, i : i + S, : i + S], q.dtype)) for i in range(0, L, S)]
    return parts, _rows_along_the_row(B, L, H * D)


# Query blocks a windowed SDPA call takes (composed: whole rows when theirs are fewer; on the CPU any consecutive
# blocks, across rows too). Backward makes the gradients of the keys and values that one call meets (and, composed,
# those keys and values again) all at once. At 1 x 8,192 bytes, blocks of 256 and a window of 512, a single call for
# all 32 blocks holds 96 MB at a time in each layer's backward; 8 a call, 24 (on the CPU 12).
WINDOW_CALL_BLOCKS = 8


def _window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      blocks: SelfAttentionBlocks) -> tuple[list[torch.Tensor], RowsOfParts]:
    """SDPA calls over [R * m, H, S, D] queries (m blocks of R rows) against [R * m, H, (back + 1) * S, D]
    keys (those of the `back` blocks before, then the block's own)."""
    B, H, L, D = q.shape
    S, n, back = blocks.size, blocks.allowed.shape[0] // B, blocks.back

    def cut(x, front):  # [B, H, L, D] -> [B, blocks, H, S, D], with `front` blocks of zeros first
        return F.pad(x, (0, 0, front * S, n * S - L)).view(B, H, front + n, S, D).transpose(1, 2)

    q, k, v = cut(q, 0), cut(k, back), cut(v, back)
    allowed = blocks.allowed.view(B, n, 1, S, (back + 1) * S)
    rows_a_call, blocks_a_call = max(1, WINDOW_CALL_BLOCKS // n), min(n, WINDOW_CALL_BLOCKS)
    parts = []  # in the order of the blocks: row by row
    for first_row in range(0, B, rows_a_call):
        for start in range(0, n, blocks_a_call):
            call = (slice(first_row, first_row + rows_a_call), slice(start, start + blocks_a_call))

            def windows(x: torch.Tensor, call=call) -> torch.Tensor:  # the keys each block meets
                start, stop, _ = call[1].indices(n)
                return torch.cat([x[call[0], start + j : stop + j] for j in range(back + 1)], dim=3).flatten(0, 1)

            # SDPA keeps its keys and values for backward: recipes instead of back + 1 copies of them
            keys, values = (remade(windows, x) for x in (k, v))
            additive = remade(_additive, allowed[call].flatten(0, 1), q.dtype)
            parts.append(F.scaled_dot_product_attention(q[call].flatten(0, 1), keys, values, attn_mask=additive))
    return parts, _rows_of_blocks(B, L, H * D)


def _slots_read_group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: SlotsReadGroup) -> torch.Tensor:
    """q [B, H, G * slots, D], k and v [B, H, Lk, D]: each key meets the slots of its group, and a softmax
    runs over each group's keys (scatter sums over groups). Cost ~ Lk * slots, not G * slots * Lk."""
    B, H, Lk, D = k.shape
    s, G = mask.slots, q.shape[2] // mask.slots
    group = mask.key_group[:, None, :, None]  # [B, 1, Lk, 1]
    q_at_keys = remade(_slots_of_groups, q, group.expand(B, H, Lk, s * D))  # the slots each key meets
    group = group.expand(B, H, Lk, s)
    scores = torch.bmm(q_at_keys, k.reshape(B * H * Lk, D, 1)).view(B, H, Lk, s) * D**-0.5  # [B, H, Lk, slots]
    # Subtracting each group's max keeps exp() finite; the softmax does not depend on it, so no gradient.
    # (Dtypes from the results, not the inputs: autocast may have made the scores bf16 from float32 q and k.)
    top = torch.full((B, H, G, s), float("-inf"), dtype=scores.dtype, device=q.device)
    top = top.scatter_reduce(2, group, scores.detach(), "amax")
    weights = (scores - top.gather(2, group)).exp()
    total = torch.zeros_like(top).scatter_add(2, group, weights)  # [B, H, G, slots]; 0 for keyless groups
    weighted = weights[..., None] * v[:, :, :, None, :]
    summed = torch.zeros(B, H, G, s, D, dtype=weighted.dtype, device=q.device)
    summed = summed.scatter_add(2, group[..., None].expand(B, H, Lk, s, D), weighted)
    return (summed / total.clamp_min(torch.finfo(total.dtype).tiny)[..., None]).view(B, H, G * s, D)


def _slots_of_groups(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """x [B, H, G * slots, D], groups [B, H, L, slots * D] (each row's group, repeated): the slots of each
    row's group, [B * H * L, slots, D]."""
    B, H, L, row = groups.shape
    D = x.shape[-1]
    return x.reshape(B, H, -1, row).gather(2, groups).view(B * H * L, row // D, D)


def _read_group_slots(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: ReadGroupSlots) -> torch.Tensor:
    """q [B, H, Lq, D], k and v [B, H, G * slots, D]: each query gathers its group's slots and takes a
    softmax over those few. Cost ~ Lq * slots, not Lq * G * slots."""
    B, H, Lq, D = q.shape
    s = mask.slots
    index = mask.query_group.clamp(min=0)[:, None, :, None].expand(B, H, Lq, s * D)
    k, v = (remade(_slots_of_groups, x, index) for x in (k, v))  # the slots each query reads
    scores = torch.bmm(k, q.reshape(B * H * Lq, D, 1)).view(B, H, Lq, s) * D**-0.5
    weights = torch.softmax(scores, dim=-1)  # [B, H, Lq, slots]
    # A query of group -1 (BLT: in a row that starts with padding, no patch yet) reads nothing: a zero
    # update, as SDPA on the CPU gives a query that may see no key.
    weights = weights * (mask.query_group >= 0)[:, None, :, None]
    return torch.bmm(weights.view(B * H * Lq, 1, s), v).view(B, H, Lq, D)


def _by_the_cpu_kernel(q: torch.Tensor, mask) -> bool:
    """Whether attention_rows runs as _CPUBlockAttention: blocks on the CPU, eagerly (compiled, Dynamo traces the
    composition of SDPA calls instead)."""
    return isinstance(mask, SelfAttentionBlocks) and q.device.type == "cpu" and not torch.compiler.is_compiling()


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


class _CPUBlockAttention(torch.autograd.Function):
    """SelfAttentionBlocks as rows [B, L, H * D], run on the CPU by torch's flash-attention kernel in the calls of
    _WindowCalls (windowed) or _CausalCalls, and backward adds each call's key and value gradients straight into
    those of all the keys. Through autograd each slice of the keys would fill and add a zero tensor of all of them:
    at 1 x 8,192 bytes and a window of 512 that took a byte layer's attention ~15% longer, forward and backward, and
    in the global transformer (2,048 patches, causal) ~70 ms of a 3.9 s BLT training step. The same outputs
    bitwise; key and value gradients summed in another order."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: SelfAttentionBlocks) -> torch.Tensor:
        calls = (_WindowCalls if blocks.windowed else _CausalCalls)(blocks, *q.shape)
        q, k, v = calls.flat(q), calls.flat(k, calls.back), calls.flat(v, calls.back)  # laid out: kept for backward
        results = [_FLASH(*calls.operands(c, q, k, v), attn_mask=calls.mask(c, q.dtype)) for c in range(len(calls))]
        rows = calls.rows([out for out, _ in results])
        ctx.calls = calls
        ctx.save_for_backward(q, k, v, rows, *(lse for _, lse in results))
        return rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        calls = ctx.calls
        q, k, v, rows, *lses = ctx.saved_tensors
        grads = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for c, grad_c, out_c, lse in zip(range(len(calls)), calls.by_call(grad), calls.by_call(rows), lses):
            q_c, k_c, v_c = calls.operands(c, q, k, v)
            calls.add_gradients(c, grads, _FLASH_BACKWARD(grad_c, q_c, k_c, v_c, out_c, lse, dropout_p=0.0,
                                                          is_causal=False, attn_mask=calls.mask(c, q.dtype)))
        dq, dk, dv = grads
        return calls.unflat(dq), calls.unflat(dk, calls.back), calls.unflat(dv, calls.back), None


class _CausalCalls:
    """How _CPUBlockAttention runs causal blocks: a call a block of S queries against the keys up to its end, q, k and
    v [B, H, L, D] as they are (copied where a position's values are strided: the kernel's op, called directly, reads
    them as adjacent, where SDPA checks)."""

    back = 0  # blocks of zeros before the keys: none

    def __init__(self, blocks: SelfAttentionBlocks, B: int, H: int, L: int, D: int):
        self.blocks, self.S, self.B, self.H, self.L, self.D = blocks, blocks.size, B, H, L, D

    def __len__(self) -> int:
        return -(-self.L // self.S)

    def flat(self, x: torch.Tensor, front: int = 0) -> torch.Tensor:
        return x if x.stride(-1) == 1 else x.contiguous()

    def unflat(self, x: torch.Tensor, front: int = 0) -> torch.Tensor:
        return x

    def operands(self, c: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        start, end = c * self.S, (c + 1) * self.S
        return q[:, :, start:end], k[:, :, :end], v[:, :, :end]

    def mask(self, c: int, dtype: torch.dtype) -> torch.Tensor:
        start, end = c * self.S, (c + 1) * self.S
        return _additive(self.blocks.allowed[:, :, start:end, :end], dtype)

    def rows(self, outs: list[torch.Tensor]) -> torch.Tensor:
        return _rows_along_the_row(self.B, self.L, self.H * self.D)(*outs)

    def by_call(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Rows [B, L, H * D] (outputs or their gradients) as each call's [B, H, S, D]."""
        return [rows[:, c * self.S : (c + 1) * self.S].unflatten(2, (self.H, self.D)).transpose(1, 2)
                for c in range(len(self))]

    def add_gradients(self, c: int, grads: tuple[torch.Tensor, ...], grads_c: tuple[torch.Tensor, ...]) -> None:
        """Call c's gradients of its queries, keys and values into those of all of them."""
        (dq, dk, dv), (dq_c, dk_c, dv_c), end = grads, grads_c, (c + 1) * self.S
        dq[:, :, c * self.S : end].copy_(dq_c)
        dk[:, :, :end].add_(dk_c)
        dv[:, :, :end].add_(dv_c)


class _WindowCalls:
    """How _CPUBlockAttention lays out windowed blocks' [B, H, L, D]: each head's positions of all rows end to end,
    [H, B * n * S, D] (n blocks of S a row, the last padded), keys and values behind `back` blocks of zeros. The
    keys that block g (counted over all rows) meets are then positions g * S to (g + back + 1) * S of the keys'
    layout: a window that may reach into the row before, which the mask rules out as it does the zeros. Calls take
    WINDOW_CALL_BLOCKS consecutive blocks (the last fewer), which may span two rows. (Heads laid side by side
    instead, a key every H * D floats, the kernel ran ~4% slower.)"""

    def __init__(self, blocks: SelfAttentionBlocks, B: int, H: int, L: int, D: int):
        self.blocks, self.S, self.back = blocks, blocks.size, blocks.back
        self.B, self.H, self.L, self.D, self.n = B, H, L, D, blocks.allowed.shape[0] // B
        self.starts = [*range(0, B * self.n, WINDOW_CALL_BLOCKS), B * self.n]  # each call's first block

    def __len__(self) -> int:
        return len(self.starts) - 1

    def flat(self, x: torch.Tensor, front: int = 0) -> torch.Tensor:
        """x [B, H, L, D] laid out, behind `front` blocks of zeros."""
        flat = x.new_zeros(self.H, (front + self.B * self.n) * self.S, self.D)
        self.unflat(flat, front).copy_(x)
        return flat

    def unflat(self, flat: torch.Tensor, front: int = 0) -> torch.Tensor:
        """The [B, H, L, D] view of what flat(x, front) laid out."""
        rows = flat[:, front * self.S :].view(self.H, self.B, self.n * self.S, self.D)
        return rows[:, :, : self.L].transpose(0, 1)

    def blocks_of(self, flat: torch.Tensor, c: int, shift: int = 0) -> torch.Tensor:
        """[m, H, S, D]: the m blocks of call c in flat (queries, or their gradients), or in the keys' layout
        those `shift` blocks on: the shift-th block of each block's window (its own at shift = back)."""
        first, stop = self.starts[c] + shift, self.starts[c + 1] + shift
        return flat[:, first * self.S : stop * self.S].view(self.H, stop - first, self.S, self.D).transpose(0, 1)

    def operands(self, c: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Call c's queries [m, H, S, D] and the keys and values of its blocks' windows [m, H, (back + 1) * S, D]."""
        S, m = self.S, self.starts[c + 1] - self.starts[c]
        # [H, (m + back) * S, D] -> windows of (back + 1) * S positions every S: [H, m, D, W] -> [m, H, W, D]
        windows = (x.narrow(1, self.starts[c] * S, (m + self.back) * S).unfold(1, (self.back + 1) * S, S)
                   .permute(1, 0, 3, 2) for x in (k, v))
        return self.blocks_of(q, c), *windows

    def mask(self, c: int, dtype: torch.dtype) -> torch.Tensor:
        return _additive(self.blocks.allowed[self.starts[c] : self.starts[c + 1]], dtype)

    def add_gradients(self, c: int, grads: tuple[torch.Tensor, ...], grads_c: tuple[torch.Tensor, ...]) -> None:
        """Call c's gradients of its queries, and of its blocks' windows of keys and values, into those of all of
        them (laid out)."""
        (dq, dk, dv), (dq_c, dk_c, dv_c) = grads, grads_c
        self.blocks_of(dq, c).copy_(dq_c)
        for j in range(self.back + 1):  # the j-th block of each window: keys `j` blocks on from its first
            for d, d_c in ((dk, dk_c), (dv, dv_c)):
                self.blocks_of(d, c, shift=j).add_(d_c[:, :, j * self.S : (j + 1) * self.S])

    def rows(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """The calls' outputs [m, H, S, D] (in memory [m, S, H, D]) as rows [B, L, H * D]."""
        return _rows_of_blocks(self.B, self.L, self.H * self.D)(*outs)

    def by_call(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Rows [B, L, H * D] (outputs or their gradients) as each call's [m, H, S, D], the layout of its output."""
        if self.n * self.S != self.L:
            rows = F.pad(rows, (0, 0, 0, self.n * self.S - self.L))
        blocks = rows.reshape(-1, self.S, self.H, self.D)
        return [blocks[self.starts[c] : self.starts[c + 1]].transpose(1, 2) for c in range(len(self))]
