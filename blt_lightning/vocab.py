"""The byte vocabulary (BLT_SPEC section 1): 256 byte values shifted up by 4 special ids.

Keeping exactly this layout keeps the released BLT checkpoints importable.
"""

import torch

PAD = 0  # "BOE" in the reference; fills rows past the end of the data
BOS = 1
EOS = 2
RESERVED = 3  # a BPE delimiter in the reference; never produced here
OFFSET = 4  # id = byte + OFFSET
VOCAB_SIZE = 256 + OFFSET


def encode(data: bytes) -> torch.Tensor:
    """A document as ids: BOS, its bytes shifted by OFFSET, EOS. Any bytes are valid (no UTF-8 check)."""
    ids = torch.empty(len(data) + 2, dtype=torch.long)
    ids[0], ids[-1] = BOS, EOS
    if data:
        ids[1:-1] = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + OFFSET
    return ids


def decode(ids: torch.Tensor) -> bytes:
    """The bytes among ids, specials dropped."""
    ids = ids.flatten()
    return bytes((ids[ids >= OFFSET] - OFFSET).to(torch.uint8).tolist())


def is_byte(ids: torch.Tensor) -> torch.Tensor:
    """True where an id stands for a byte of text (what bits-per-byte counts)."""
    return ids >= OFFSET


def document_ids(ids: torch.Tensor) -> torch.Tensor:
    """Number each position by the document it belongs to within its row.

    Every document starts with BOS, so a running count of BOS tells documents apart; a row that starts
    in the middle of a document numbers that part 0. Attention and patches must stay inside a number.
    """
    return torch.cumsum(ids == BOS, dim=-1)
