"""Callbacks the fault tests add to CLI runs (`--config` a YAML naming them, PYTHONPATH=tests)."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys

import torch
from lightning.pytorch.callbacks import Callback


class RecordBatches(Callback):
    """Append (global step, rank, digest of the ids) of every training batch to a JSON-lines file."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        digest = hashlib.sha256(batch["ids"].numpy().tobytes()).hexdigest()[:16]
        record = {"step": trainer.global_step, "rank": trainer.global_rank, "ids": digest,
                  "shards": sorted(set(batch["shard"].tolist()))}
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), f"{self.path}.rank{trainer.global_rank}.weights")


class SendSignal(Callback):
    """Send this process `signal` when a training batch starts at global step `step` (on rank `rank` only, if
    given); with `group`, send it to the process group (DataLoader workers and their forkserver too) from
    another process, as schedulers do (a worker takes the trainer's own SIGTERM for the DataLoader ending it)."""

    def __init__(self, step: int, signal: str = "SIGKILL", rank: int | None = None, group: bool = False):
        self.step, self.signal, self.rank, self.group = step, signal, rank, group

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            number = getattr(signal, self.signal)
            if self.group:
                kill = f"import os; os.killpg({os.getpgrp()}, {int(number)})"
                subprocess.run([sys.executable, "-c", kill], start_new_session=True, check=True)  # not in the group
            else:
                os.kill(os.getpid(), number)


class SendSignalInTheSanityCheck(Callback):
    """Send this process `signal` as the sanity check's first batch starts, on rank `rank` only."""

    def __init__(self, signal: str, rank: int):
        self.signal, self.rank = signal, rank

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking and batch_idx == 0 and trainer.global_rank == self.rank:
            os.kill(os.getpid(), getattr(signal, self.signal))


class DieWhileSaving(Callback):
    """SIGKILL this process halfway through writing the first checkpoint saved at or after step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        save = torch.save

        def save_half_then_die(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_half_then_die


class DivergeAt(Callback):
    """Turn the output layer's weights to inf when the batch at global step `step` starts: the loss diverges."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.output.weight.fill_(float("inf"))
