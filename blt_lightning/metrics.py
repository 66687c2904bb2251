"""Bits per byte (BLT_SPEC section 5) as a torchmetrics Metric, summed exactly over ranks."""

import math

import torch
from torchmetrics import Metric

from .vocab import is_byte


class BitsPerByte(Metric):
    """bpb = (cross entropy in nats summed over predicted bytes) / (ln 2 * number of bytes).

    Nats are summed in float64 and bytes counted in int64 (exact), over ranks before the division, so the result is the bpb of the whole
    set however it is split across ranks and batches (never a mean of per-batch values). Only targets
    that are bytes count: predictions of EOS, BOS and padding are left out. (The reference divides by
    all predicted positions, EOS included, which gives a slightly lower number.)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("nats", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bytes", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, cross_entropy: torch.Tensor, targets: torch.Tensor) -> None:
        """cross_entropy: unreduced, in nats, one per target id; targets: the ids it was computed for."""
        counted = is_byte(targets)
        self.nats += cross_entropy.double()[counted].sum()
        self.bytes += counted.sum()

    def compute(self) -> torch.Tensor:
        return bits_per_byte(self.nats, self.bytes)

    def totals(self) -> tuple[float, int]:
        """(bpb, bytes) over all ranks. Every rank must call it, since it gathers from all of them."""
        with self.sync_context():  # sums the states over ranks inside, restores them on exit
            return float(bits_per_byte(self.nats, self.bytes)), int(self.bytes)


def bits_per_byte(nats: torch.Tensor, n_bytes: torch.Tensor) -> torch.Tensor:
    return nats / (math.log(2) * n_bytes.double())  # a Python float times a long tensor would be float32
