"""Two nodes of one process each, launched by torchrun on loopback (gloo, CPU): both stages train a few
steps; the ranks read disjoint shards and end with identical weights."""

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


def torchrun_two_nodes(config: str, root: Path, manifest: Path, *extra: str) -> None:
    record = root / "batches"
    callbacks = root / "callbacks.yaml"
    root.mkdir(parents=True)
    callbacks.write_text(json.dumps({"trainer": {"callbacks": [
        {"class_path": "probes.RecordBatches", "init_args": {"path": str(record)}}]}}))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "blt_lightning", "fit", "--config", str(ROOT / config), "--config", str(callbacks),
             "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp",
             "--trainer.default_root_dir", str(root), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
             "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
             "--trainer.enable_model_summary", "false", "--data.sources", "null", "--data.manifest", str(manifest),
             "--data.seq_len", "32", "--data.batch_size", "2", "--data.num_workers", "1", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for node in range(2)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
        assert "sync_dist=True" not in err, "an epoch-level metric is logged from one rank only"

    reads = [[json.loads(line) for line in Path(f"{record}.rank{r}").read_text().splitlines()] for r in range(2)]
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
