"""Run by test_ddp.py: a few steps of Lightning's FSDP on CPU (2 ranks, gloo) that record what each rank's
optimizer holds. Lightning runs FSDPStrategy on GPUs only; a subclass passes its check, and FSDP is given the
CPU as its device. (Saving a whole state dict crashes torch's FSDP on CPU, so nothing is saved.)"""

import json
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel

from blt_lightning import BLTLM, ByteShardDataModule, EntropyLM
from blt_lightning.models import EntropyModelConfig
from blt_lightning.models.blt import BLTConfig
from blt_lightning.models.layers import TransformerBlock
from blt_lightning.patching import PatchingConfig

ENTROPY = EntropyModelConfig(dim=32, n_layers=2, n_heads=2)
BLT = BLTConfig(encoder_dim=16, encoder_heads=2, global_dim=32, global_layers=2, global_heads=2, decoder_dim=16,
                decoder_layers=1, decoder_heads=2, local_window=8, ngram_table_size=101, ffn_multiple_of=16)


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model):
        wrap = FullyShardedDataParallel.__init__

        def on_the_cpu(fsdp, *args, **kwargs):
            wrap(fsdp, *args, **{**kwargs, "device_id": torch.device("cpu")})

        FullyShardedDataParallel.__init__ = on_the_cpu
        try:
            return super()._setup_model(model)
        finally:
            FullyShardedDataParallel.__init__ = wrap


MODELS = {  # tiny ones of each stage (BLT: static patches, no entropy model)
    "entropy": lambda: EntropyLM(ENTROPY, seq_len=32),
    "blt": lambda: BLTLM(BLT, patching=PatchingConfig(mode="static", patch_size=4), seq_len=32),
}


class RecordOptimizer(L.Callback):
    def on_train_end(self, trainer, pl_module):
        groups = [{"weight_decay": g["weight_decay"], "elements": sum(p.numel() for p in g["params"])}
                  for g in trainer.optimizers[0].param_groups]
        (Path(sys.argv[1]) / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"groups": groups, "step": trainer.global_step, "loss": float(trainer.callback_metrics["train/loss"])}))


if __name__ == "__main__":
    out, manifest = sys.argv[1], sys.argv[2]
    L.seed_everything(0)
    data = ByteShardDataModule(manifest=manifest, seq_len=32, batch_size=4)
    model = MODELS[sys.argv[3]]()  # with its example row, which Lightning's model summary runs
    strategy = CPUFSDPStrategy(auto_wrap_policy={TransformerBlock}, timeout=timedelta(seconds=120))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=[RecordOptimizer()])
    trainer.fit(model, data)
