"""Run by test_ddp.py: a few steps of real DDP on CPU (2 ranks x 2 DataLoader workers) that records
what each rank reads, for the test to check."""

import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from blt_lightning import ByteShardDataModule, EntropyLM
from blt_lightning.models import EntropyModelConfig


class RecordingLM(EntropyLM):
    def on_fit_start(self):
        self.seen = {"train": [], "validation": []}

    def training_step(self, batch, batch_idx):
        self.seen["train"].append({k: batch[k].clone() for k in ("ids", "shard")})
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.seen["validation"].append({k: batch[k].clone() for k in ("ids", "shard", "row")})
        return super().validation_step(batch, batch_idx)

    def on_fit_end(self):
        out = Path(sys.argv[1])
        torch.save({**self.seen, "bpb": float(self.trainer.callback_metrics["val/bpb"])},
                   out / f"rank{self.global_rank}.pt")


if __name__ == "__main__":
    out, manifest = sys.argv[1], sys.argv[2]
    L.seed_everything(0)
    # batches_per_epoch comes from the manifest: about one pass over the training bytes per epoch
    data = ByteShardDataModule(manifest=manifest, seq_len=64, batch_size=4, num_workers=2)
    model = RecordingLM(EntropyModelConfig(dim=16, n_layers=1, n_heads=2), seq_len=64)
    # A collective that waits longer than this fails the run instead of hanging it.
    strategy = DDPStrategy(timeout=timedelta(seconds=120))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(model, data)
