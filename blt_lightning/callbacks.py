"""Callbacks the configs use."""

from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    def __init__(self, output_dir: str | None = None):
        """Save what `predict` returns, one file per batch and rank: <output_dir>/rank<R>-batch<N>.pt.

        Args:
            output_dir: Where the files go (default: "predictions" in the run's log directory).
        """
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        out = Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "predictions")
        out.mkdir(parents=True, exist_ok=True)
        torch.save(prediction, out / f"rank{trainer.global_rank}-batch{batch_idx:06d}.pt")
