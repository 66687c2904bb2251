"""Bits per byte (BLT_SPEC section 5) as a torchmetrics Metric, summed exactly over ranks."""

import math

import torch
from torchmetrics import Metric

from .streams import GROUP_KINDS
from .vocab import is_byte


class BitsPerByte(Metric):
    """bpb = (cross entropy in nats summed over predicted bytes) / (ln 2 * number of bytes).

    Nats are summed in float64 and bytes counted in int64 (exact), over ranks before the division, so the
    result is the bpb of the whole set however it is split across ranks and batches (never a mean of
    per-batch values). Only targets that are bytes count: predictions of EOS, BOS and padding are left out.
    (The reference divides by all predicted positions, EOS included, which gives a slightly lower number.)
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


class BitsPerByteByGroup:
    """Nats and bytes summed per group (a document's source, its language), from per-target group keys.

    Totals are Python floats (float64) and ints, kept per rank; `gathered` adds up every rank's through
    the Lightning strategy, so any number of groups, named on any rank, comes out whole.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.totals: dict[str, dict[str, list]] = {kind: {} for kind in GROUP_KINDS}  # kind -> name -> [nats, bytes]

    def update(self, cross_entropy: torch.Tensor, targets: torch.Tensor, keys: dict[str, torch.Tensor],
               names: dict[int, str]) -> None:
        """keys[kind]: [B, L] group key of each target (as cross_entropy); names: key -> group name."""
        counted = is_byte(targets)
        nats = cross_entropy.double()[counted]
        for kind in GROUP_KINDS:
            groups, inverse = keys[kind][counted].unique(return_inverse=True)
            sums = torch.zeros(len(groups), dtype=torch.float64, device=nats.device).index_add_(0, inverse, nats)
            counts = torch.bincount(inverse, minlength=len(groups))
            for key, n, b in zip(groups.tolist(), sums.tolist(), counts.tolist()):
                total = self.totals[kind].setdefault(names[key], [0.0, 0])
                total[0] += n
                total[1] += b

    def gathered(self, strategy) -> dict[str, dict[str, dict]]:
        """{kind: {name: {"bpb", "bytes"}}} over all ranks; every rank must call it."""
        merged = {kind: {} for kind in GROUP_KINDS}
        for rank in range(strategy.world_size):
            for kind, groups in strategy.broadcast(self.totals, src=rank).items():
                for name, (n, b) in groups.items():
                    total = merged[kind].setdefault(name, [0.0, 0])
                    total[0] += n
                    total[1] += b
        return {kind: {name: {"bpb": n / (math.log(2) * b), "bytes": b} for name, (n, b) in sorted(groups.items())}
                for kind, groups in merged.items()}
