"""Callbacks the configs use."""

import itertools
import os
import signal
import subprocess
import threading
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
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


class LastCheckpoint(Callback):
    """Keep last.ckpt at the newest step: write it after every validation while fitting and when training
    ends, beside the run's ModelCheckpoint (where `--ckpt_path last` looks), so a resumed run continues
    where this one stopped.

    Lightning's ModelCheckpoint(save_last=True) writes last.ckpt only at steps where it also writes a top-k
    checkpoint (since Lightning 2.6): monitoring val/bpb, only when it improves. A run resumed from it would
    go back to its best step and train the rest again, and steps after the last validation were in no file.
    """

    def __init__(self):
        self._saved_step = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def _save(self, trainer) -> None:
        if trainer.global_step != self._saved_step:
            save_last(trainer)
            self._saved_step = trainer.global_step


class JobRequeued(SystemExit):
    """Ends a run after its checkpoint is saved and its SLURM job requeued (exit status 0)."""


class CheckpointOnTerminate(Callback):
    """On SIGTERM (what schedulers and `kill` send before SIGKILL) save last.ckpt, then let the run exit;
    under SLURM, on its requeue signal (SIGUSR1 before the time limit: configs/launch/slurm.sbatch) save
    last.ckpt, requeue the job and exit.

    Both are saved between batches, on every rank at once (all ranks take part, as sharded strategies
    need), where the weights and the training data's position are exact. A checkpoint does not hold
    gradients being accumulated, so only a save after an optimizer step resumes exactly.
    - SIGTERM: Lightning raises at the next batch on every rank (this callback does so for a single
      process), within gradient accumulation too.
    - SLURM's signal: Lightning would save from inside the signal handler, wherever the step happens to
      be: an optimizer step half applied, ranks in different collectives (Lightning issue #21406). This
      callback installs a handler that only raises a flag, before Lightning's (which then leaves the
      signal alone); the ranks agree on it after each optimizer step. (DataLoader workers and their
      forkserver never see either signal: workers.py.)
    Other exceptions save nothing: a run stopped by a non-finite loss keeps its last good checkpoint.
    """

    def __init__(self):
        self.requeue_signal = None  # SLURM's, while this callback handles it
        self.requeue_requested = False
        self._previous_handler = None
        self._step_at_batch_start = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment  # what Lightning's signal handling reads
        if stage == "fit" and isinstance(environment, SLURMEnvironment) and environment.auto_requeue \
                and environment.requeue_signal is not None and threading.current_thread() is threading.main_thread():
            self.requeue_signal = environment.requeue_signal
            self._previous_handler = signal.signal(self.requeue_signal, self._request_requeue)

    def _request_requeue(self, signum, frame) -> None:
        self.requeue_requested = True

    def on_train_batch_start(self, trainer, *args) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, *args) -> None:
        # With several ranks Lightning stops at the next batch; a single process it would let run to the
        # end of the epoch (which may be the end of the run).
        if trainer.received_sigterm and trainer.world_size == 1:
            raise SIGTERMException()
        stepped = trainer.global_step != self._step_at_batch_start  # the same on every rank
        unfinished = trainer.max_steps == -1 or trainer.global_step < trainer.max_steps
        if self.requeue_signal is not None and stepped and unfinished \
                and trainer.strategy.reduce_boolean_decision(self.requeue_requested, all=False):
            path = save_last(trainer)
            rank_zero_info(f"SLURM requeue signal: saved {path} at step {trainer.global_step}")
            if trainer.is_global_zero:
                requeue_slurm_job()
            raise JobRequeued()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # SIGTERM before the requeue was acted on (the signal came during validation, or the time left ran
        # out): the job is still requeued, from the checkpoint saved here.
        requeue = self.requeue_requested and trainer.is_global_zero
        self._restore_signal()
        if isinstance(exception, SIGTERMException) and (path := save_last(trainer)):
            rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")
            if requeue:
                requeue_slurm_job()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_signal()

    def _restore_signal(self) -> None:
        if self.requeue_signal is not None:
            signal.signal(self.requeue_signal, self._previous_handler)
            self.requeue_signal, self.requeue_requested = None, False


def slurm_job_id() -> str:
    """This SLURM job's id (array job and task for an array), which a requeued job keeps."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]


def requeue_slurm_job() -> None:
    job = slurm_job_id()
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        problem = done.stderr.strip() if done.returncode else None
    except (OSError, subprocess.TimeoutExpired) as error:
        problem = str(error)
    if problem:
        rank_zero_warn(f"could not requeue SLURM job {job} ({problem}): resubmit it with --ckpt_path last")
    else:
        rank_zero_info(f"requeued SLURM job {job}: it resumes from last.ckpt")


def save_last(trainer) -> Path | None:
    """Save last.ckpt where the run's ModelCheckpoint keeps it (every rank takes part); None without one."""
    checkpoint = trainer.checkpoint_callback
    if checkpoint is None or checkpoint.dirpath is None:
        return None
    path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
    trainer.save_checkpoint(path)
    return path


class FlopBudget(Callback):
    def __init__(self, flops: float, sample_batches: int = 8):
        """Train for a budget of FLOPs instead of a number of steps: max_steps becomes the budget over
        the FLOPs of an optimizer step (the trained model's training FLOPs per byte, for BLT at the mean
        patch size of the first validation batches, times the global batch in bytes). The frozen entropy
        model's FLOPs are not counted, as in the BLT paper's FLOP-matched comparisons.

        Args:
            flops: Training FLOPs to spend, all ranks together.
            sample_batches: Validation batches the mean patch size is measured on.
        """
        self.flops, self.sample_batches = flops, sample_batches

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        data = trainer.datamodule
        batches = itertools.islice(iter(data.val_dataloader()), self.sample_batches)
        per_byte, patch_size = pl_module.training_flops_per_byte(batches)
        step_bytes = data.batch_size * pl_module.seq_len * trainer.world_size * trainer.accumulate_grad_batches
        # Ranks measure on different batches: rank 0's count stands for all, so every rank stops together.
        steps = trainer.strategy.broadcast(max(1, round(self.flops / (per_byte * step_bytes))), src=0)
        trainer.fit_loop.epoch_loop.max_steps = steps  # before configure_optimizers, which sizes the schedule by it
        rank_zero_info(f"FLOP budget {self.flops:.3g}: {per_byte / 1e6:.3f} MFLOPs per trained byte "
                       f"at a mean patch size of {patch_size:.2f} x {step_bytes:,} bytes per step = {steps:,} steps")
