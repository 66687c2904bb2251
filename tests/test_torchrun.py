"""Runs launched by torchrun on loopback (gloo, CPU). Two nodes of one process each: both stages train a few
steps; the ranks read disjoint shards and end with identical weights. One node of two, with --max-restarts: a
rank that gets SIGTERM ends the attempt, and the restarted ranks resume from last.ckpt."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blt_lightning.prepare import MANIFEST
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def loopback_env(**extra: str) -> dict:
    """A torchrun's environment, read when the test runs (after conftest's fixtures clear SLURM's variables)."""
    return {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
            **extra}


def fit_on_loopback(config: str, root: Path, manifest: Path, callbacks: list[dict], *extra: str) -> list[str]:
    """The arguments of a small fit of `config` on `manifest` under DDP, after torchrun's, with `callbacks`."""
    root.mkdir(parents=True)
    (root / "callbacks.yaml").write_text(json.dumps({"trainer": {"callbacks": callbacks}}))
    return ["-m", "blt_lightning", "fit", "--config", str(ROOT / config), "--config", str(root / "callbacks.yaml"),
            "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(root), "--trainer.limit_val_batches", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.sources", "null", "--data.manifest", str(manifest), "--data.seq_len", "32",
            "--data.batch_size", "2", "--data.num_workers", "1", *extra]


def recorded_batches(record: Path, ranks: int = 2) -> list[list[dict]]:
    return [[json.loads(line) for line in Path(f"{record}.rank{r}").read_text().splitlines()] for r in range(ranks)]


def torchrun_two_nodes(config: str, root: Path, manifest: Path, *extra: str) -> None:
    record = root / "batches"
    fit = fit_on_loopback(config, root, manifest, [{"class_path": "probes.RecordBatches",
                                                    "init_args": {"path": str(record)}}],
                          "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.max_steps", "3",
                          "--trainer.val_check_interval", "3", *extra)
    port = free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), *fit],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=loopback_env())
        for node in range(2)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
        assert "sync_dist=True" not in err, "an epoch-level metric is logged from one rank only"

    reads = recorded_batches(record)
    assert [len(r) for r in reads] == [3, 3]
    shards = [{s for batch in r for s in batch["shards"]} for r in reads]
    assert shards[0] and shards[1] and not shards[0] & shards[1], f"ranks read the same shards: {shards}"
    weights = [torch.load(f"{record}.rank{r}.weights") for r in range(2)]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), f"{name} differs between the nodes"


@pytest.mark.parametrize("stage", ["entropy", "blt"])
def test_two_nodes_read_disjoint_data_and_end_with_identical_weights(stage, shards, entropy_checkpoint, tmp_path):
    if stage == "entropy":
        torchrun_two_nodes("configs/entropy/tiny.yaml", tmp_path / stage, shards / MANIFEST,
                           "--model.init_args.model.dim", "32", "--model.init_args.model.n_layers", "1")
    else:
        torchrun_two_nodes("configs/blt/tiny.yaml", tmp_path / stage, shards / MANIFEST,
                           "--model.init_args.patching.mode", "entropy", "--model.init_args.patching.threshold", "2.0",
                           "--model.init_args.entropy_checkpoint", str(entropy_checkpoint),
                           "--model.init_args.model.global_layers", "1",
                           "--model.init_args.model.ngram_table_size", "101")


def test_torchrun_restarts_the_ranks_from_last_checkpoint_after_one_gets_sigterm(shards, tmp_path):
    """README's `torchrun --standalone --max-restarts ... --ckpt_path last`: rank 1's SIGTERM at step 1 saves
    last.ckpt at step 2 on both ranks and ends the attempt; torchrun starts both again, and they train steps 2 and
    3 only. (Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 the restarted ranks fail to connect.)"""
    root, record = tmp_path / "run", tmp_path / "run" / "batches"
    fit = fit_on_loopback("configs/entropy/tiny.yaml", root, shards / MANIFEST, [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": None}},
        {"class_path": "blt_lightning.callbacks.LastCheckpoint"},
        {"class_path": "blt_lightning.callbacks.CheckpointOnTerminate"},
        {"class_path": "probes.RecordBatches", "init_args": {"path": str(record)}},
        {"class_path": "probes.SendSignal", "init_args": {"step": 1, "signal": "SIGTERM", "rank": 1}}],
        "--trainer.devices", "2", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
        "--model.init_args.model.dim", "32", "--model.init_args.model.n_layers", "1", "--ckpt_path", "last")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--max-restarts", "1", "--nproc_per_node", "2",
         *fit],
        capture_output=True, text=True, timeout=300, env=loopback_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SIGTERM: saved" in done.stderr and "at step 2" in done.stderr, done.stderr[-3000:]
    assert [[batch["step"] for batch in rank] for rank in recorded_batches(record)] == [[0, 1, 2, 3]] * 2


def test_a_torchrun_that_restarts_ranks_with_its_shared_store_is_warned_of(monkeypatch):
    from blt_lightning.cli import torchrun_restarts_share_its_store

    for restarts, shared, expected in (("3", "True", True), ("3", "False", False), ("0", "True", False)):
        monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", restarts)
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", shared)
        assert torchrun_restarts_share_its_store() is expected
    monkeypatch.delenv("TORCHELASTIC_MAX_RESTARTS")
    assert not torchrun_restarts_share_its_store()
