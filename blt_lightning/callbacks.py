"""Callbacks the configs use."""

import os
import random
import signal
import subprocess
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .errors import BadInput


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


class OptimizerSteps:
    """Whether the latest training batch ended with an optimizer step (within gradient accumulation, not every
    batch does): what the checkpoint callbacks save after, the one point that resumes exactly."""

    _step_at_batch_start = 0

    def on_train_batch_start(self, trainer, *args) -> None:
        self._step_at_batch_start = trainer.global_step

    def stepped(self, trainer) -> bool:
        """From the end of a batch until the next begins (validation included); the same on every rank."""
        return trainer.global_step != self._step_at_batch_start


class LastCheckpoint(OptimizerSteps, Checkpoint):
    """Keep last.ckpt at the newest step: write it after every validation while fitting, at max_steps and when
    training ends otherwise, beside the run's ModelCheckpoint (where `--ckpt_path last` looks), so a resumed run
    continues where this one stopped. At max_steps it saves as that batch ends, a point Lightning resumes from
    exactly; saved after training ends, a run extended from it (a larger max_steps) gained an epoch, and under
    gradient accumulation grouped the batches after it into other steps. (A validation at that step saves
    last.ckpt once more, with its top-k file.)

    Lightning's ModelCheckpoint(save_last=True) writes last.ckpt only at steps where it also writes a top-k
    checkpoint (since Lightning 2.6): monitoring val/bpb, only when it improves. A run resumed from it would
    go back to its best step and train the rest again, and steps after the last validation were in no file.

    A Checkpoint, so Lightning calls it after the ModelCheckpoint listed before it: last.ckpt holds that
    callback's record of this validation's top-k file. A validation between the batches of an accumulated
    step (val_check_interval not a multiple of accumulate_grad_batches) is saved when the step ends: a
    checkpoint holds no gradients being accumulated, so only one saved after an optimizer step resumes exactly.
    """

    def __init__(self):
        self._saved_step = None
        self._pending = False  # a validation waits for the end of its step

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Lightning takes the first Checkpoint for the run's (`ckpt_path="best"`): it must be a ModelCheckpoint.
        if stage == "fit" and not isinstance(trainer.checkpoint_callback, ModelCheckpoint):
            raise ValueError("LastCheckpoint writes last.ckpt in the folder of a ModelCheckpoint: list one before it "
                             "in trainer.callbacks (being a Checkpoint, it keeps Lightning from adding its own)")

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.stepped(trainer) and (self._pending or _reached_max_steps(trainer)):
            self._save(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        if self.stepped(trainer):
            self._save(trainer, again=True)  # at a step already saved (deferred), with this validation's top-k
        elif not self._pending:
            self._pending = True
            rank_zero_warn(f"validation at step {trainer.global_step} came between the batches of an accumulated "
                           "step (val_check_interval is not a multiple of accumulate_grad_batches): last.ckpt is "
                           "saved when the step ends; a ModelCheckpoint file saved now would not resume exactly")

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def _save(self, trainer, again: bool = False) -> None:
        self._pending = False
        if again or trainer.global_step != self._saved_step:
            save_last(trainer)
            self._saved_step = trainer.global_step


def global_batch_bytes(trainer, seq_len: int) -> int:
    """Bytes of an optimizer step, all ranks together: the DataModule's rows of seq_len, of every rank and
    accumulated batch."""
    return trainer.datamodule.batch_size * seq_len * trainer.world_size * trainer.accumulate_grad_batches


def _reached_max_steps(trainer) -> bool:
    """Whether the step just taken is the run's last (max_steps)."""
    return trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps


class JobRequeued(SystemExit):
    """Ends a run after its checkpoint is saved and its SLURM job requeued (exit status 0)."""


class CheckpointOnTerminate(OptimizerSteps, Callback):
    """On SIGTERM (what schedulers and `kill` send before SIGKILL) save last.ckpt, then end the run; under
    SLURM, on its requeue signal (SIGUSR1 before the time limit: configs/launch/slurm.sbatch) save last.ckpt,
    requeue the job and end the run.

    Either signal only raises a flag: the run goes on to the end of the optimizer step under way, gradient
    accumulation included, and after each optimizer step the ranks agree on the flags (a signal to any rank
    stops all) and save together (sharded strategies need every rank), where the weights and the training
    data's position are exact. A checkpoint holds no gradients being accumulated, so only a save after an
    optimizer step resumes exactly. The run ends once that step is logged and, if one is due there, validated
    (before the next batch trains, or as the epoch ends): the resumed run, which Lightning resumes as validated
    at that step, starts with the next, and the curves miss no step. (A SLURM job is requeued as soon as the
    checkpoint is written, before that validation, which SLURM's ending of the job may cut short: requeued only
    after it, a job whose time limit came first would not be requeued at all.) Lightning's own handlers, which this
    callback's replace from the sanity check on, would stop at the next batch, within an accumulation too, or in a
    validation on the signalled rank alone (SIGTERM), or save from inside the handler, wherever the step happens
    to be: an optimizer step half applied, ranks in different collectives (SLURM's signal; Lightning issue #21406).
    (DataLoader workers and their forkserver never see either signal: workers.py.)
    Exceptions save nothing: a run stopped by a non-finite loss keeps its last good checkpoint. Nor does a run
    without a ModelCheckpoint, or under fast_dev_run: SIGTERM ends it, and SLURM's signal only warns, as a
    requeued job would start the run over (and again at every time limit).
    """

    def __init__(self):
        self.requeue_requested = self.terminate_requested = False
        self._handlers = {}  # signal -> (this callback's handler, the one it replaced)
        self._ending: SystemExit | None = None  # how the run ends, once its checkpoint is saved

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.requeue_requested = self.terminate_requested = False
        self._ending = None
        self._handlers.clear()  # this run's own (an earlier run with this callback put back what it could)
        # SLURM's signal: before Lightning registers its handlers, which then leave that signal alone.
        environment = trainer._accelerator_connector.cluster_environment  # what Lightning's signal handling reads
        if stage == "fit" and isinstance(environment, SLURMEnvironment) and environment.auto_requeue \
                and environment.requeue_signal is not None:
            self._handle(environment.requeue_signal, self._request_requeue)

    # SIGTERM: after Lightning registered its handler (as the run starts), which this one replaces before the sanity
    # check: Lightning's would end the check on the signalled rank alone, the others waiting for it in a collective.
    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._take_over_sigterm(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._take_over_sigterm(trainer)  # where no sanity check ran

    def _take_over_sigterm(self, trainer) -> None:
        if signal.SIGTERM in self._handlers:
            return
        launcher = trainer.strategy.launcher

        def request_termination(signum, frame) -> None:
            if not self.terminate_requested and launcher is not None:
                launcher.kill(signum)  # the ranks Lightning started itself, as its own handler does
            self.terminate_requested = True

        self._handle(signal.SIGTERM, request_termination)
        if trainer.received_sigterm:  # to Lightning's handler, before this one: taken over
            self.terminate_requested = True
            trainer._signal_connector.received_sigterm = False  # else Lightning stops after the next batch

    def _handle(self, signum: int, handler) -> None:
        if threading.current_thread() is threading.main_thread():  # only there can Python set handlers
            self._handlers[signum] = (handler, signal.signal(signum, handler))

    def _request_requeue(self, signum, frame) -> None:
        self.requeue_requested = True

    def on_train_batch_end(self, trainer, *args) -> None:
        if not (self.stepped(trainer) and not _reached_max_steps(trainer) and self._handlers):
            return
        requeue, terminate = self.requeue_requested, self.terminate_requested
        if trainer.world_size > 1:  # any rank's signal stops every rank
            flags = torch.tensor([requeue, terminate], device=trainer.strategy.root_device).int()
            requeue, terminate = trainer.strategy.reduce(flags, reduce_op="sum").bool().tolist()
        if not (requeue or terminate):
            return
        path = save_last(trainer)
        if requeue and path is None:
            # The requeued job would start this run over, and again at each time limit: it trains on until then.
            self.requeue_requested = requeue = False
            if not terminate:
                rank_zero_warn(f"SLURM requeue signal at step {trainer.global_step}: {NOTHING_SAVED}, so the job is "
                               "not requeued (it would start over); training goes on until the time limit ends it")
                return
        if requeue:
            if trainer.is_global_zero:
                requeue_slurm_job()
            trainer.strategy.barrier("requeue")  # no rank leaves (srun --kill-on-bad-exit) before it is done
        if terminate:
            saved = f"saved {path}" if path else NOTHING_SAVED
            rank_zero_info(f"SIGTERM: {saved} at step {trainer.global_step}"
                           + ("; resume with --ckpt_path last" if path else "; the run ends"))
            self._ending = SIGTERMException()
        else:
            rank_zero_info(f"SLURM requeue signal: saved {path} at step {trainer.global_step}")
            self._ending = JobRequeued()

    # Lightning logs a step's metrics, and validates if due, after on_train_batch_end: the run ends at the next hook.
    def on_train_batch_start(self, trainer, *args) -> None:
        self._end()
        super().on_train_batch_start(trainer, *args)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._end()

    def _end(self) -> None:
        if self._ending is not None:
            ending, self._ending = self._ending, None
            raise ending

    # When the run ends Lightning puts back the handlers it found (SIG_DFL, or this callback's requeue handler,
    # set before it looked): each is restored where it is still this callback's. (After an exception Lightning
    # calls no teardown hook, and leaves the requeue handler of this callback in place.)
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_signals()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_signals()
        self._handlers.clear()

    def _restore_signals(self) -> None:
        for signum, (ours, previous) in self._handlers.items():
            if signal.getsignal(signum) is ours:
                signal.signal(signum, previous)


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


NOTHING_SAVED = "nothing saved (no ModelCheckpoint, or fast_dev_run)"


def save_last(trainer) -> Path | None:
    """Save last.ckpt where the run's ModelCheckpoint keeps it (every rank takes part); None without one, and
    under fast_dev_run (which saves no checkpoint, as Lightning's own callbacks do not)."""
    checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    if checkpoint is None or checkpoint.dirpath is None or trainer.fast_dev_run:
        return None
    path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
    trainer.save_checkpoint(path, weights_only=False)  # the whole state a run resumes from
    return path


def drawn_from_all(items: Iterable, k: int, seed: int = 0) -> Iterator:
    """k of `items` drawn uniformly from all of them (reservoir sampling: each is read once), in their order.
    Nothing is read until the first is asked for: a model whose FLOPs do not depend on its data reads none."""
    rng, kept = random.Random(seed), []
    for seen, item in enumerate(items):
        if seen < k:
            kept.append((seen, item))
        elif (slot := rng.randrange(seen + 1)) < k:
            kept[slot] = (seen, item)
    yield from (item for _, item in sorted(kept, key=lambda pair: pair[0]))


class FlopBudget(Callback):
    def __init__(self, flops: float, sample_batches: int = 8):
        """Train for a budget of FLOPs instead of a number of steps: max_steps becomes the budget over
        the FLOPs of an optimizer step (the trained model's training FLOPs per byte, for BLT at the mean
        patch size of validation batches drawn from the whole split, times the global batch in bytes). The
        frozen entropy model's FLOPs are not counted, as in the BLT paper's FLOP-matched comparisons.

        Args:
            flops: Training FLOPs to spend, all ranks together.
            sample_batches: Validation batches the mean patch size is measured on (by rank 0, for all ranks),
                drawn at random (seeded) from all of its share of the split: shards keep their inputs' order,
                so the first batches would hold the first source's documents only.
        """
        self.flops, self.sample_batches = flops, sample_batches

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        data = trainer.datamodule

        def batches_with_bytes():  # read only if the model asks: the entropy model's FLOPs need no data
            # Batches of padding alone (a rank's share topped up to the longest's) have no patches to measure.
            yield from (batch for batch in data.val_dataloader() if batch["bytes"])

        measured, error = None, None
        if trainer.is_global_zero:  # on its share of the split, for all ranks, so that every rank stops together
            try:
                measured = pl_module.training_flops_per_byte(drawn_from_all(batches_with_bytes(), self.sample_batches))
            except Exception as caught:  # every rank stops with it: none is left waiting at the broadcast
                error, measured = caught, str(caught)
        measured = trainer.strategy.broadcast(measured, src=0)
        if error is not None:
            raise error
        if isinstance(measured, str):
            raise BadInput(f"flops_budget: rank 0 could not measure the mean patch size: {measured}")
        per_byte, patch_size = measured
        step_bytes = global_batch_bytes(trainer, pl_module.seq_len)
        steps = max(1, round(self.flops / (per_byte * step_bytes)))
        trainer.fit_loop.epoch_loop.max_steps = steps  # before configure_optimizers, which sizes the schedule by it
        rank_zero_info(f"FLOP budget {self.flops:.3g}: {per_byte / 1e6:.3f} MFLOPs per trained byte "
                       f"at a mean patch size of {patch_size:.2f} x {step_bytes:,} bytes per step = {steps:,} steps")
