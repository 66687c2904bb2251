"""Runs that are killed resume exactly: real CLI processes, killed with real signals."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from blt_lightning import ByteShardDataModule, EntropyLM
from blt_lightning.callbacks import CheckpointOnTerminate, LastCheckpoint
from blt_lightning.models import EntropyModelConfig
from blt_lightning.prepare import MANIFEST
from blt_lightning.training import warmup_cosine
from conftest import SLURM_ONE_TASK, command_on_path, free_port
from probes import SendSignalInTheSanityCheck

ROOT = Path(__file__).resolve().parents[1]
# The model a run trains: its config and what shrinks it (stage one; stage two adds its entropy checkpoint).
ENTROPY_MODEL = ("configs/entropy/tiny.yaml", "--model.init_args.model.dim", "32",
                 "--model.init_args.model.n_layers", "1")
BLT_MODEL = ("configs/blt/tiny.yaml", "--data.seq_len", "64", "--model.init_args.patching.mode", "monotonic")


def cli_run(root: Path, corpus: Path, callbacks: list[dict], *extra: str, workers: int = 2,
            env: dict | None = None, model: tuple[str, ...] = ENTROPY_MODEL) -> subprocess.CompletedProcess:
    """`blt-lightning fit` of a tiny model (an entropy model unless `model` says otherwise) for 10 steps
    (epochs of 3 batches), as its own process, with `callbacks` (class path and init args) besides a
    checkpoint every 3 steps and on SIGTERM; `env` adds to its environment."""
    return finish(cli_start(root, corpus, callbacks, *extra, workers=workers, env=env, model=model))


def cli_start(root: Path, corpus: Path, callbacks: list[dict], *extra: str, workers: int = 2,
              env: dict | None = None, model: tuple[str, ...] = ENTROPY_MODEL) -> subprocess.Popen:
    """cli_run's process, started (finish() waits for it): a reference run goes on beside the one under test."""
    args, env = fit_command(root, corpus, callbacks, *extra, workers=workers, env=env, model=model)
    # Its own session: a signal to its process group reaches it, its DataLoader workers and their forkserver only.
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a cli_start process; one that hangs is killed, with its workers, rather than left running."""
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def fit_command(root: Path, corpus: Path, callbacks: list[dict], *extra: str, workers: int = 2,
                env: dict | None = None, model: tuple[str, ...] = ENTROPY_MODEL) -> tuple[list[str], dict]:
    """What cli_run runs, and in which environment."""
    listed = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
               "init_args": {"monitor": None, "every_n_train_steps": 3, "save_last": True}},
              {"class_path": "blt_lightning.callbacks.CheckpointOnTerminate"}]
    config = root / "callbacks.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"trainer": {"callbacks": listed + callbacks}}))  # JSON is YAML
    args = [
        sys.executable, "-m", "blt_lightning", "fit", "--config", str(ROOT / model[0]),
        "--config", str(config), "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", "10", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.sources", f"[{corpus}]", "--data.prepare.shard_bytes", "2000", "--data.seq_len", "32",
        "--data.batch_size", "4", "--data.num_workers", str(workers), "--data.batches_per_epoch", "3",
        "--data.shuffle_rows", "8", *model[1:], *extra,
    ]
    return args, {**os.environ, "PYTHONPATH": str(Path(__file__).parent), **(env or {})}


def fake_scontrol(tmp_path: Path) -> dict:
    """The environment in which `scontrol` only writes its arguments to tmp_path/scontrol.log."""
    return command_on_path(tmp_path, "scontrol", f'echo "$@" >> {tmp_path / "scontrol.log"}')


def record(path: Path) -> dict:
    return {"class_path": "probes.RecordBatches", "init_args": {"path": str(path)}}


def signal_at(step: int, name: str, rank: int | None = None, group: bool = False) -> dict:
    return {"class_path": "probes.SendSignal",
            "init_args": {"step": step, "signal": name, "rank": rank, "group": group}}


def trained(path: Path) -> list[tuple[int, str]]:
    """(global step, digest) of each batch rank 0 drew, in order."""
    return [(r["step"], r["ids"]) for r in map(json.loads, Path(f"{path}.rank0").read_text().splitlines())]


def trained_batches(checkpoint: dict) -> int:
    """The training batches a checkpoint's data position says were trained on."""
    (loader,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    return loader["batches"]


def batches(path: Path) -> dict[int, str]:
    """Global step -> digest of the (last) batch trained at it."""
    return dict(trained(path))


def last_checkpoint(root: Path) -> dict:
    (path,) = root.glob("*/version_*/checkpoints/last.ckpt")
    return torch.load(path, weights_only=False)


def test_sigkill_and_sigterm_then_resume_see_the_same_batches_and_end_with_the_same_weights(corpus, tmp_path):
    """Steps of 2 batches, epochs of 8 and a validation every 3 batches: validations and signals come between the
    batches of a step, where no checkpoint resumes exactly; both wait for the step to end."""
    steps = ("--trainer.accumulate_grad_batches", "2", "--data.batches_per_epoch", "8",
             "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1")
    last = {"class_path": "blt_lightning.callbacks.LastCheckpoint"}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    uninterrupted = cli_start(whole, corpus, [record(whole / "batches")], *steps)
    # SIGKILL as step 3 starts (batch 5): the validation after batch 3 was saved after step 2 (batch 4).
    # Started as a restarting launcher starts every attempt, with --ckpt_path last: there is none yet, so afresh.
    killed = cli_run(cut, corpus, [record(cut / "a"), last, signal_at(2, "SIGKILL")], *steps, "--ckpt_path", "last")
    assert finish(uninterrupted).returncode == 0
    expected = trained(whole / "batches")
    assert len(expected) == 20 and len(set(expected)) == 20 and expected[-1][0] == 9
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "validation at step 1 came between the batches of an accumulated step" in killed.stderr
    assert trained(cut / "a") == expected[:5]  # batch 5 was drawn, not trained
    assert last_checkpoint(cut)["global_step"] == 2

    # Resumed, it is sent SIGTERM as step 7 starts (batch 13), with its DataLoader workers (as schedulers send it):
    # it saves last.ckpt when that step ends (mid epoch 1, where the second of two workers is next) and exits.
    terminated = cli_run(cut, corpus, [record(cut / "b"), last, signal_at(6, "SIGTERM", group=True)], *steps,
                         "--ckpt_path", "last")
    assert terminated.returncode == 128 + signal.SIGTERM, terminated.stderr[-3000:]  # not finished: not status 0
    assert "SIGTERM: saved" in terminated.stderr + terminated.stdout
    assert last_checkpoint(cut)["global_step"] == 7

    resumed = cli_run(cut, corpus, [record(cut / "c"), last], *steps, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert trained(cut / "b") == expected[4:14]
    assert trained(cut / "c") == expected[14:]
    assert len(list(cut.glob("entropy-tiny/version_*"))) == 1, "a resumed run continues in its own folder"
    # The step that saved on SIGTERM was logged before the run ended: the three runs' curves miss no step.
    events = EventAccumulator(str(cut / "entropy-tiny" / "version_0"))
    events.Reload()
    assert {event.step for event in events.Scalars("train/loss")} == set(range(10))

    final, reference = torch.load(f"{cut / 'c'}.rank0.weights"), torch.load(f"{whole / 'batches'}.rank0.weights")
    assert final.keys() == reference.keys()
    for name in reference:
        assert torch.equal(final[name], reference[name]), f"{name} differs after resuming"


def test_stage_two_patched_on_the_fly_resumes_exactly_after_a_sigkill(corpus, tmp_path, entropy_checkpoint):
    """BLT, its frozen entropy model patching every batch: the same batches and bitwise the same weights."""
    model = (*BLT_MODEL, "--model.init_args.entropy_checkpoint", str(entropy_checkpoint))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    uninterrupted = cli_start(whole, corpus, [record(whole / "batches")], workers=0, model=model)
    killed = cli_run(cut, corpus, [record(cut / "a"), signal_at(5, "SIGKILL")], workers=0, model=model)
    assert finish(uninterrupted).returncode == 0
    expected = batches(whole / "batches")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert last_checkpoint(cut)["global_step"] == 3
    resumed = cli_run(cut, corpus, [record(cut / "b")], "--ckpt_path", "last", workers=0, model=model)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert batches(cut / "b") == {s: expected[s] for s in range(3, 10)}
    final, reference = torch.load(f"{cut / 'b'}.rank0.weights"), torch.load(f"{whole / 'batches'}.rank0.weights")
    assert any(name.startswith("entropy_model.") for name in reference)
    for name in reference:
        assert torch.equal(final[name], reference[name]), f"{name} differs after resuming"


def test_slurms_requeue_signal_saves_after_an_optimizer_step_requeues_and_the_job_resumes_exactly(corpus, tmp_path):
    accumulate = ("--trainer.accumulate_grad_batches", "2")  # a step is 2 batches (epochs of 3 end on 1)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    uninterrupted = cli_start(whole, corpus, [record(whole / "batches")], *accumulate)
    job = {**SLURM_ONE_TASK, "SLURM_JOB_ID": "77", **fake_scontrol(tmp_path)}

    # SIGUSR1 (SLURM, before the time limit) as step 4's first batch starts: nothing is saved within the
    # accumulation; last.ckpt after step 4's optimizer step, no hpc checkpoint from inside the signal
    # handler, the job requeued, the run ended.
    signalled = cli_run(cut, corpus, [record(cut / "a"), signal_at(4, "SIGUSR1", group=True)], *accumulate, env=job)
    assert signalled.returncode == 0, signalled.stderr[-3000:]
    assert finish(uninterrupted).returncode == 0
    expected = batches(whole / "batches")  # the last batch of each step
    run = cut / "entropy-tiny/slurm-77"
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 5
    assert not list(cut.rglob("hpc_ckpt_*.ckpt"))
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]

    requeued = cli_run(cut, corpus, [record(cut / "b")], *accumulate, env=job)  # the same job id, no --ckpt_path
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert batches(cut / "a") == {s: expected[s] for s in range(5)}
    assert batches(cut / "b") == {s: expected[s] for s in range(5, 10)}
    final, reference = torch.load(f"{cut / 'b'}.rank0.weights"), torch.load(f"{whole / 'batches'}.rank0.weights")
    for name in reference:
        assert torch.equal(final[name], reference[name]), f"{name} differs after the requeue"


def test_a_sigterm_before_the_requeue_is_acted_on_still_saves_and_requeues(corpus, tmp_path):
    job = {**SLURM_ONE_TASK, "SLURM_JOB_ID": "79", **fake_scontrol(tmp_path)}
    run = cli_run(tmp_path, corpus, [signal_at(4, "SIGUSR1"), signal_at(4, "SIGTERM")], env=job, workers=0)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr[-3000:]
    assert torch.load(tmp_path / "entropy-tiny/slurm-79/checkpoints/last.ckpt", weights_only=False)["global_step"] == 5
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "79"]


def test_slurms_requeue_signal_to_one_rank_stops_every_rank_at_one_step_and_the_job_resumes_exactly(corpus, tmp_path):
    """Two SLURM tasks (as srun starts them: DDP over gloo, one process a rank). SIGUSR1 reaches rank 1 only: both
    ranks save together after that step, rank 0 requeues once, and the requeued pair ends as an uninterrupted one."""
    requeue = fake_scontrol(tmp_path)

    def two_tasks(root: Path, job: str, callbacks: list[dict]) -> list[subprocess.Popen]:
        port, processes = str(free_port()), []
        for rank in range(2):
            env = {**SLURM_ONE_TASK, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": str(rank),
                   "SLURM_LOCALID": str(rank), "SLURM_JOB_ID": job, "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
                   "GLOO_SOCKET_IFNAME": "lo", **requeue}
            args, env = fit_command(root, corpus, [record(root / "batches"), *callbacks], "--trainer.devices", "2",
                                    "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu", workers=1, env=env)
            processes.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        return processes

    def succeed(processes: list[subprocess.Popen]) -> None:
        for process in processes:
            _, err = process.communicate(timeout=300)
            assert process.returncode == 0, err[-3000:]

    succeed(two_tasks(tmp_path / "whole", "90", []))  # not beside the others: each pair takes a free port
    cut = tmp_path / "cut"
    succeed(two_tasks(cut, "88", [signal_at(4, "SIGUSR1", rank=1)]))
    assert torch.load(cut / "entropy-tiny/slurm-88/checkpoints/last.ckpt", weights_only=False)["global_step"] == 5
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 88"]
    succeed(two_tasks(cut, "88", []))  # requeued
    for rank in range(2):
        final = torch.load(f"{cut / 'batches'}.rank{rank}.weights")
        reference = torch.load(f"{tmp_path / 'whole' / 'batches'}.rank{rank}.weights")
        for name in reference:
            assert torch.equal(final[name], reference[name]), f"rank {rank}: {name} differs after the requeue"


def test_a_kill_while_saving_leaves_the_previous_checkpoint_usable(corpus, tmp_path):
    died = cli_run(tmp_path, corpus, [{"class_path": "probes.DieWhileSaving", "init_args": {"step": 5}}], workers=0)
    assert died.returncode == -signal.SIGKILL
    assert list(tmp_path.rglob(".*.ckpt.partial")), "the kill did not come during a save"
    assert last_checkpoint(tmp_path)["global_step"] == 3  # step 6's save was cut in half
    resumed = cli_run(tmp_path, corpus, [], "--ckpt_path", "last", workers=0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert last_checkpoint(tmp_path)["global_step"] == 9  # it trained on from step 3, saving every 3 steps


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    run = cli_run(tmp_path, corpus, [{"class_path": "probes.DivergeAt", "init_args": {"step": 4}}], workers=0)
    assert run.returncode == 1
    assert "blt-lightning: step 4: the training loss is not finite" in run.stderr
    assert "Traceback" not in run.stderr  # a fact about the run, not a bug: its message alone
    checkpoint = last_checkpoint(tmp_path)
    assert checkpoint["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def tiny_fit(shards: Path, callbacks: list, **options) -> tuple[EntropyLM, ByteShardDataModule, L.Trainer]:
    """A tiny entropy model, its data and a Trainer for a few steps in this process."""
    module = EntropyLM(EntropyModelConfig(dim=32, n_layers=1, n_heads=2), seq_len=16)
    data = ByteShardDataModule(manifest=str(shards / MANIFEST), seq_len=16, batch_size=4)
    options = {"max_steps": 4, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
               "limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False, **options}
    return module, data, L.Trainer(callbacks=callbacks, **options)


def test_an_infinite_gradient_stops_the_run_before_it_reaches_the_weights(shards):
    """The loss is finite, a gradient is not: gradient clipping would turn every weight to NaN."""

    class InfiniteGradientAt(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            if trainer.global_step == 2:
                self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}
                next(pl_module.parameters()).grad[0] = float("inf")

    probe = InfiniteGradientAt()
    module, data, trainer = tiny_fit(shards, [probe], gradient_clip_val=1.0)
    with pytest.raises(FloatingPointError, match="step 2: the gradients are not finite"):
        trainer.fit(module, data)
    assert all(torch.equal(probe.weights[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("when", ["before_the_sanity_check", "in_the_sanity_check"])
def test_a_sigterm_before_training_starts_saves_after_the_first_optimizer_step(when, shards, tmp_path):
    """Sent as the sanity check starts, before CheckpointOnTerminate's hook there, it reaches Lightning's handler
    (registered as the run starts); in the sanity check's first batch, CheckpointOnTerminate's. Either way the
    sanity check runs to its end: Lightning would end it after that batch, on the signalled rank alone (under DDP
    the other ranks would wait for it in a collective), and save nothing."""

    class SigtermAsTheSanityCheckStarts(L.Callback):
        def on_sanity_check_start(self, trainer, pl_module):
            os.kill(os.getpid(), signal.SIGTERM)

    sigterm = (SigtermAsTheSanityCheckStarts() if when == "before_the_sanity_check"
               else SendSignalInTheSanityCheck("SIGTERM", rank=0))
    before = signal.getsignal(signal.SIGTERM)
    callbacks = [sigterm, ModelCheckpoint(tmp_path), CheckpointOnTerminate()]  # sigterm's hooks run first
    module, data, trainer = tiny_fit(shards, callbacks, enable_checkpointing=True, accumulate_grad_batches=2,
                                     limit_val_batches=2, num_sanity_val_steps=2)
    with pytest.raises(SIGTERMException):
        trainer.fit(module, data)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 1 and trained_batches(saved) == 2, "saved within the first step"
    assert signal.getsignal(signal.SIGTERM) == before, "the handlers are put back"


def test_a_sigterm_run_ends_once_the_step_it_saved_is_logged_and_validated(shards, tmp_path):
    """Saved after step 2, where a validation is due: the step's training metrics are logged and the validation
    runs before the run ends (the resumed run, resumed as validated there, starts at step 3)."""

    class Probe(L.Callback):
        logged, validated = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.validated.append(trainer.global_step)

    class Logged(L.pytorch.loggers.CSVLogger):
        def log_metrics(self, metrics, step=None):
            Probe.logged += [step] * ("train/loss" in metrics)

    callbacks = [ModelCheckpoint(tmp_path), CheckpointOnTerminate(), Probe()]
    module, data, trainer = tiny_fit(shards, callbacks, enable_checkpointing=True, limit_val_batches=1,
                                     val_check_interval=2, log_every_n_steps=1, logger=Logged(tmp_path))
    with pytest.raises(SIGTERMException):
        trainer.fit(module, data)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 2
    assert Probe.logged == [0, 1] and Probe.validated == [2]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_a_run_that_saves_no_checkpoint_says_so_and_a_slurm_job_is_not_requeued(
        signum, shards, tmp_path, monkeypatch, caplog):
    """Requeued, the job would start the run over at every time limit: SLURM's signal warns and training goes on.
    SIGTERM ends the run, saying that nothing was saved."""

    class SignalAt(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signum)

    for name, value in {**SLURM_ONE_TASK, "SLURM_JOB_ID": "81", **fake_scontrol(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    module, data, trainer = tiny_fit(shards, [CheckpointOnTerminate(), SignalAt()], max_steps=4)
    if signum == signal.SIGTERM:
        with caplog.at_level("INFO"), pytest.raises(SIGTERMException):
            trainer.fit(module, data)
        assert "SIGTERM: nothing saved (no ModelCheckpoint, or fast_dev_run) at step 3; the run ends" in caplog.text
    else:
        with pytest.warns(UserWarning, match="SLURM requeue signal at step 3: nothing saved .* not requeued"):
            trainer.fit(module, data)
        assert trainer.global_step == 4, "training went on"
    assert not (tmp_path / "scontrol.log").exists()


def test_last_checkpoint_records_the_best_file_of_a_validation_at_the_step_of_a_deferred_save(shards, tmp_path):
    """Steps of 4 batches, a validation every 2: the one within step 1 is saved when it ends, where the next
    validation falls too; last.ckpt is saved again after it, and names the best file there is."""
    callbacks = [ModelCheckpoint(tmp_path, monitor="val/bpb"), LastCheckpoint(), CheckpointOnTerminate()]
    module, data, trainer = tiny_fit(shards, callbacks, enable_checkpointing=True, accumulate_grad_batches=4,
                                     val_check_interval=2, limit_val_batches=1, max_steps=3)
    before = signal.getsignal(signal.SIGTERM)
    trainer.fit(module, data)
    assert signal.getsignal(signal.SIGTERM) == before, "a fit that ends puts the handlers back"
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    (best,) = [state["best_model_path"] for name, state in saved["callbacks"].items() if name.startswith("ModelCh")]
    assert Path(best).is_file()


class RecordDigests(L.Callback):
    """(global step, digest of the ids) of every training batch, and the weights at the end, in memory."""

    def __init__(self):
        self.trained = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.trained.append((trainer.global_step, hashlib.sha256(batch["ids"].numpy().tobytes()).hexdigest()))

    def on_train_end(self, trainer, pl_module):
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_as_long_as_its_epochs_resumes_mid_epoch_with_the_batches_it_would_have_seen(workers, shards, tmp_path):
    """With max_epochs (or a FLOP budget, under which max_steps starts at -1) Lightning loads the training data to
    count the schedule's steps before a checkpoint restores the stream's position (Lightning issue 20550)."""
    def run(checkpoints: Path, ckpt_path: Path | None = None):
        digests = RecordDigests()
        every_3_steps = ModelCheckpoint(checkpoints, every_n_train_steps=3, save_top_k=-1)
        module, data, trainer = tiny_fit(shards, [digests, every_3_steps], max_steps=-1, max_epochs=2,
                                         enable_checkpointing=True)
        data.batches_per_epoch, data.num_workers = 5, workers
        trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=False)
        return digests

    whole = run(tmp_path / "whole")
    assert len(whole.trained) == 10 and len({d for _, d in whole.trained}) == 10
    (at_step_3,) = (tmp_path / "whole").glob("*step=3.ckpt")  # mid-epoch 0
    resumed = run(tmp_path / "resumed", at_step_3)
    assert resumed.trained == whole.trained[3:]
    assert all(torch.equal(resumed.weights[k], v) for k, v in whole.weights.items())


def recorded_fit(shards: Path, callbacks: list, ckpt_path: Path | None = None, warmup_steps: int | None = None,
                 **options) -> tuple[RecordDigests, L.Trainer]:
    """tiny_fit from the same initial weights, with checkpoints, over epochs of 3 batches (from ckpt_path where
    given), recording its batches; warmup_steps replaces the optimizer's."""
    L.seed_everything(0)
    digests = RecordDigests()
    module, data, trainer = tiny_fit(shards, [digests, *callbacks], enable_checkpointing=True, **options)
    if warmup_steps is not None:
        module.optimizer_config = replace(module.optimizer_config, warmup_steps=warmup_steps)
    data.batches_per_epoch = 3
    trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=False)
    return digests, trainer


@pytest.mark.parametrize("first, accumulate", [(2, 2), (3, 1), (1, 2)])
def test_a_run_extended_past_its_last_step_goes_on_as_one_run_to_the_new_last_step_would(first, accumulate, shards,
                                                                                         tmp_path):
    """Epochs of 3 batches: 2 steps of 2 batches (the last one short) or 3 of 1 end with an epoch, 1 of 2 within
    one; no validation. last.ckpt is saved at the last step, where Lightning resumes from: saved after training
    ended, a run extended from it got an extra epoch, and steps of other batches under accumulation."""
    def run(max_steps: int, root: Path, ckpt_path: Path | None = None):
        return recorded_fit(shards, [ModelCheckpoint(root), LastCheckpoint()], ckpt_path, warmup_steps=100,
                            max_steps=max_steps, accumulate_grad_batches=accumulate)  # the same rate at any length

    (whole, whole_trainer), (head, _) = run(6, tmp_path / "whole"), run(first, tmp_path / "cut")
    rest, rest_trainer = run(6, tmp_path / "cut", tmp_path / "cut" / "last.ckpt")
    assert head.trained + rest.trained == whole.trained  # (step, batch): the same batches in the same steps
    assert rest_trainer.current_epoch == whole_trainer.current_epoch
    assert all(torch.equal(rest.weights[k], v) for k, v in whole.weights.items())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_epochs_cut_short_by_limit_train_batches_are_the_first_batches_of_the_streams_and_resume_exactly(
        accumulate, shards, tmp_path):
    """The stream's epochs are of 3 batches, Lightning's of 2 (limit_train_batches). The stream used to go on
    into Lightning's next epoch, which then ended after its one batch, without a step under accumulation: the
    step after took 3 batches."""
    def run(max_steps: int, root: Path, ckpt_path: Path | None = None, **options):
        every_step = ModelCheckpoint(root, every_n_train_steps=1, save_top_k=-1)
        return recorded_fit(shards, [every_step], ckpt_path, max_steps=max_steps, **options)[0]

    streams_epochs = [batch for _, batch in run(9, tmp_path / "reference").trained]
    cut = {"limit_train_batches": 2, "accumulate_grad_batches": accumulate}
    whole = run(6 // accumulate, tmp_path / "whole", **cut)
    assert [batch for _, batch in whole.trained] == [streams_epochs[i] for i in (0, 1, 3, 4, 6, 7)]
    assert [step for step, _ in whole.trained] == [i // accumulate for i in range(6)]
    (after_3_batches,) = (tmp_path / "whole").glob(f"*step={3 // accumulate}.ckpt")  # mid-epoch without accumulation
    rest = run(6 // accumulate, tmp_path / "rest", after_3_batches, **cut)
    assert rest.trained == whole.trained[accumulate * (3 // accumulate):]
    assert all(torch.equal(rest.weights[k], v) for k, v in whole.weights.items())


@pytest.mark.parametrize("length", [{"max_steps": 8}, {"max_steps": -1, "max_epochs": 2}])
def test_the_learning_rate_warms_up_then_decays_to_its_floor_at_the_last_step(length, shards):
    """Counted from max_steps, or (after warmup) from the epochs' batches."""

    class RecordRate(L.Callback):
        rates = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    module, data, trainer = tiny_fit(shards, [RecordRate()], **length)
    module.optimizer_config = replace(module.optimizer_config, lr=1e-3, warmup_steps=3, min_lr_ratio=0.1)
    data.batches_per_epoch = 4
    trainer.fit(module, data)
    assert RecordRate.rates == pytest.approx([1e-3 * warmup_cosine(step, 3, 8, 0.1) for step in range(8)])
    assert RecordRate.rates[:4] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])
    assert RecordRate.rates[-1] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))


@pytest.mark.parametrize("endless", [False, True])
def test_a_run_without_a_length_is_an_error_not_a_schedule_that_never_decays(endless, shards):
    """Neither max_steps nor max_epochs; or max_epochs of a stream without epochs (shards with no manifest), found
    when warmup ends."""
    module, data, trainer = tiny_fit(shards, [], max_steps=-1, max_epochs=2 if endless else -1)
    if endless:
        data = ByteShardDataModule(train_shards=f"pipe:cat {shards}/train-{{000000..000003}}.tar", seq_len=16,
                                   batch_size=4)
    module.optimizer_config = replace(module.optimizer_config, warmup_steps=3)
    with pytest.raises(ValueError, match="the learning-rate schedule needs a length: set trainer.max_steps"):
        trainer.fit(module, data)
    assert trainer.global_step == (4 if endless else 0)  # step 4 is the first past warmup's 3
