"""Patching (BLT_SPEC section 3): where patches begin, from next-byte entropies or simpler rules.

A row is cut into *segments* (a document, the part of a document a row starts with, a run of
padding), and patches never cross a segment's edge. In every segment the first position (BOS, or
the row's first id) is a patch of its own and the second starts a patch; from the third position t
on, the mode decides, looking only at the segment's own ids and entropies before t:

- entropy:   H(t-1) > threshold (the byte that was hard to predict starts a patch)
- monotonic: H(t-1) - H(t-2) > relative_threshold
- combined:  both
- static:    every patch_size positions (MEGABYTE)
- space:     byte t-1 is the first "spacelike" byte of a run: not an ASCII letter or digit, not a UTF-8
             continuation byte (SpaceByte, as the reference implements it)
- byte:      every position

A padding run is one patch. Last, patches longer than max_patch_length are cut into pieces of that
length and a remainder. Everything is tensor code over whole batches: no loop over positions.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .vocab import EOS, OFFSET, PAD, document_ids, is_byte

Mode = Literal["entropy", "monotonic", "combined", "static", "space", "byte"]
ENTROPY_MODES = ("entropy", "monotonic", "combined")


@dataclass(frozen=True)
class PatchingConfig:
    """How bytes are grouped into patches."""

    mode: Mode = "entropy"
    """entropy, monotonic or combined (need an entropy model); static, space or byte (do not)."""
    threshold: float | None = None
    """Entropy (nats) above which the next byte starts a patch: entropy and combined modes. Find it
    for a target mean patch size with `blt-lightning calibrate`."""
    relative_threshold: float = 0.0
    """Rise in entropy over the previous byte above which the next byte starts a patch: monotonic and
    combined modes."""
    patch_size: int = 4
    """Bytes per patch in static mode."""
    max_patch_length: int | None = None
    """Longer patches are cut into pieces of this many bytes (None: no limit)."""

    def __post_init__(self):
        if self.mode in ("entropy", "combined") and self.threshold is None:
            raise ValueError(f"{self.mode} patching needs a threshold: find one with `blt-lightning calibrate`")
        for name in ("threshold", "relative_threshold"):  # a NaN would compare False everywhere: no patches
            if (value := getattr(self, name)) is not None and not math.isfinite(value):
                raise ValueError(f"patching.{name} must be a finite number, not {value}")
        if self.patch_size < 1 or (self.max_patch_length is not None and self.max_patch_length < 1):
            raise ValueError("patch_size and max_patch_length must be at least 1")

    @property
    def needs_entropies(self) -> bool:
        return self.mode in ENTROPY_MODES


@dataclass
class Patches:
    """Patches of a batch of rows, padded to the row with most patches."""

    starts: torch.Tensor  # [B, L] bool: the position begins a patch
    patch_ids: torch.Tensor  # [B, L] long: index, within its row, of the patch each position is in
    lengths: torch.Tensor  # [B, P] long: patch lengths, 0 past the row's last patch
    mask: torch.Tensor  # [B, P] bool: the slot holds a patch of the row (False past its last patch)
    padding: torch.Tensor  # [B, P] bool: the patch is a run of PAD
    byte_lengths: torch.Tensor  # [B, P] long: bytes of each patch (not specials, not padding)
    patched_bytes: int  # bytes of the batch
    byte_patches: int  # patches that hold bytes
    next_starts: torch.Tensor  # [B] bool: the id after the row would begin a patch (what the decoder's last
                               # position reads)

    @property
    def mean_size(self) -> float:
        """Bytes per patch, over the patches that hold bytes (as the paper counts)."""
        return self.patched_bytes / self.byte_patches if self.byte_patches else 0.0


def spacelike(ids: torch.Tensor) -> torch.Tensor:
    """Ids that are not an ASCII letter or digit and not a UTF-8 continuation byte (specials included)."""
    b = ids - OFFSET
    letter_or_digit = (((b >= ord("0")) & (b <= ord("9"))) | ((b >= ord("A")) & (b <= ord("Z")))
                       | ((b >= ord("a")) & (b <= ord("z"))))
    continuation = (b >= 0x80) & (b < 0xC0)
    return ~(letter_or_digit | continuation)


def _shift_right(x: torch.Tensor, by: int, fill) -> torch.Tensor:
    """x[..., t - by] at position t (fill where t < by)."""
    shifted = torch.full_like(x, fill)
    shifted[..., by:] = x[..., : max(0, x.shape[-1] - by)]
    return shifted


def _offsets(starts: torch.Tensor) -> torch.Tensor:
    """Each position's distance from the latest True of `starts` at or before it (starts[:, 0] is True)."""
    pos = torch.arange(starts.shape[-1], device=starts.device).expand_as(starts)
    return pos - torch.cummax(torch.where(starts, pos, 0), dim=-1).values


def segment_starts(ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] bool: first position of each segment (a row's start, a document's BOS, a padding run)."""
    doc_ids = document_ids(ids) if doc_ids is None else doc_ids
    pad = ids == PAD
    first = (doc_ids != _shift_right(doc_ids, 1, -1)) | (pad != _shift_right(pad, 1, True))
    first[:, :1] = True
    return first


def patch_starts(ids: torch.Tensor, config: PatchingConfig, entropies: torch.Tensor | None = None,
                 doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L] bool: where patches begin in rows of ids [B, L], given entropies [B, L] for entropy modes."""
    first = segment_starts(ids, doc_ids)
    offset = _offsets(first)  # position within its segment
    pad = ids == PAD
    if config.mode in ENTROPY_MODES:
        if entropies is None:
            raise ValueError(f"{config.mode} patching needs entropies")
        h1, h2 = _shift_right(entropies, 1, 0.0), _shift_right(entropies, 2, 0.0)  # H(t-1), H(t-2)
        rule = torch.ones_like(first)
        if config.mode in ("entropy", "combined"):
            rule &= h1 > config.threshold
        if config.mode in ("monotonic", "combined"):
            rule &= (h1 - h2) > config.relative_threshold
    elif config.mode == "static":
        rule = (offset - 1) % config.patch_size == 0
    elif config.mode == "space":
        sp = spacelike(ids)
        rule = _shift_right(sp, 1, True) & ~_shift_right(sp, 2, True)
    elif config.mode == "byte":
        rule = torch.ones_like(first)
    else:
        raise ValueError(f"unknown patching mode {config.mode!r}")
    starts = first | (~pad & ((offset == 1) | ((offset >= 2) & rule)))
    if config.max_patch_length is not None:  # padding stays one patch: cutting it would only cost patches
        starts |= ~pad & (_offsets(starts) % config.max_patch_length == 0)
    return starts


def patches_from_starts(starts: torch.Tensor, ids: torch.Tensor, next_starts: torch.Tensor,
                        num_patches: int | None = None) -> Patches:
    """Patch ids, lengths and mask from start flags (and next_starts, for a byte after each row).
    `num_patches` pads every row to that many patches (static shapes); rows with more are an error."""
    patch_ids = torch.cumsum(starts, dim=-1) - 1  # [B, L]
    counts = starts.sum(-1)  # [B]
    most = int(counts.max()) if counts.numel() else 0
    P = most if num_patches is None else num_patches
    if most > P:
        raise ValueError(f"a row has {most} patches, more than the budget of {num_patches}")
    per_patch = lambda values: torch.zeros(starts.shape[0], P, dtype=torch.long,
                                           device=starts.device).scatter_add_(1, patch_ids, values)
    lengths = per_patch(torch.ones_like(patch_ids))
    byte_lengths = per_patch(is_byte(ids).long())
    mask = torch.arange(P, device=starts.device)[None, :] < counts[:, None]
    padding = mask & (per_patch((ids == PAD).long()) == lengths)
    return Patches(starts, patch_ids, lengths, mask, padding, byte_lengths, int(byte_lengths.sum()),
                   int((byte_lengths > 0).sum()), next_starts)


def patch(ids: torch.Tensor, config: PatchingConfig, entropies: torch.Tensor | None = None,
          doc_ids: torch.Tensor | None = None, num_patches: int | None = None) -> Patches:
    """Patches of rows of ids [B, L] (entropies [B, L] for the entropy modes).

    Whether the id after a row would begin a patch depends on the row alone, and tells which patch the
    row's last position may read. After EOS it would: a document's last patch ends at its EOS, the next
    document begins with BOS (or padding follows). Else the rules run over the row and one byte more (the
    answer depends on H(L-1), the last ids)."""
    def extend(x: torch.Tensor, value) -> torch.Tensor:  # value None: repeat the last column (of a row that has one)
        if value is None and x.shape[1]:
            return torch.cat([x, x[:, -1:]], dim=1)
        column = torch.full((x.shape[0], 1), value or 0, dtype=x.dtype, device=x.device)
        return torch.cat([x, column], dim=1)

    starts = patch_starts(extend(ids, OFFSET), config, None if entropies is None else extend(entropies, 0.0),
                          None if doc_ids is None else extend(doc_ids, None))
    ends_document = (ids[:, -1:] == EOS).any(-1)  # False for empty rows
    return patches_from_starts(starts[:, :-1], ids, starts[:, -1] | ends_document, num_patches)
