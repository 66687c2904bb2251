"""Callbacks the configs use."""

from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


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


class CheckpointOnTerminate(Callback):
    """On SIGTERM (what schedulers and `kill` send before SIGKILL) save last.ckpt, then let the run exit.

    Lightning turns SIGTERM into an exception at the next batch on every rank at once (this callback
    does so for a single process); it saves the checkpoint there (all ranks take part, as sharded
    strategies need), where the training data's position is exact, so `--ckpt_path last` resumes as if nothing had happened. Other exceptions
    save nothing: a run stopped by a non-finite loss keeps its last good checkpoint. Under SLURM,
    Lightning itself saves and requeues on SIGUSR1 (see configs/launch/slurm.sbatch).
    """

    def on_train_batch_end(self, trainer, *args) -> None:
        # With several ranks Lightning stops at the next batch; a single process it would let run to the
        # end of the epoch (which may be the end of the run).
        if trainer.received_sigterm and trainer.world_size == 1:
            raise SIGTERMException()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        checkpoint = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or checkpoint is None or checkpoint.dirpath is None:
            return
        path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")
