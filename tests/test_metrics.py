import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blt_lightning.metrics import BitsPerByte
from blt_lightning.vocab import BOS, EOS, PAD
from conftest import free_port


def test_equals_a_hand_computation():
    metric = BitsPerByte()
    targets = torch.tensor([[70, 71, EOS, BOS], [72, PAD, PAD, PAD]])
    ce = torch.tensor([[1.0, 2.0, 5.0, 7.0], [0.5, 9.0, 9.0, 9.0]])
    metric.update(ce, targets)
    metric.update(torch.tensor([[0.25]]), torch.tensor([[100]]))
    # Only the four byte targets count: (1 + 2 + 0.5 + 0.25) nats over 4 bytes.
    assert metric.compute().dtype == torch.float64
    assert math.isclose(float(metric.compute()), 3.75 / math.log(2) / 4, rel_tol=1e-12)


def _rank(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    metric = BitsPerByte()
    if rank == 0:  # three batches, 30 bytes
        for _ in range(3):
            metric.update(torch.full((10,), 1.0), torch.full((10,), 50))
    else:  # one batch, 2 bytes with a much higher loss
        metric.update(torch.full((2,), 4.0), torch.full((2,), 50))
    results[rank] = (float(metric.compute()), metric.totals())
    dist.destroy_process_group()


def test_sums_over_ranks_with_unequal_batches():
    port = free_port()
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(2, port, results), nprocs=2)
    exact = (30 * 1.0 + 2 * 4.0) / math.log(2) / 32  # not the mean of the ranks' values, (1 + 4) / ln 2 / 2
    for rank in (0, 1):
        bpb, (total_bpb, total_bytes) = results[rank]
        assert bpb == pytest.approx(exact, rel=1e-12) and total_bpb == pytest.approx(exact, rel=1e-12)
        assert total_bytes == 32
