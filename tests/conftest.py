import gzip
import json
import os
import random
import socket
from pathlib import Path

import pytest
import torch

from blt_lightning.prepare import PrepareOptions, prepare


def pytest_configure(config):
    """Under pytest-xdist (`make test`) the suite's processes share the cores: each takes one torch thread, as do
    the CLI processes it starts, since OpenMP threads that outnumber the cores spin and slow every test."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch):
    """The suite may itself run in a SLURM job, whose variables change how fits name their folders and resume:
    tests see none unless they set them."""
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)


def command_on_path(tmp_path: Path, name: str, script: str) -> dict:
    """The environment in which `name` is a shell script of `script`, found first on the PATH."""
    command = tmp_path / "bin" / name
    command.parent.mkdir(exist_ok=True)
    command.write_text(f"#!/bin/sh\n{script}\n")
    command.chmod(0o755)
    return {"PATH": f"{command.parent}:{os.environ['PATH']}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kept_for_backward(fn, excluding: set[int] = frozenset()):
    """fn()'s result, and the bytes of the distinct storages autograd keeps for backward while it runs, but
    those at the addresses in `excluding` (the weights', say)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(n for address, n in storages.items() if address not in excluding)


def kept_under_recipes(monkeypatch) -> dict[int, tuple[torch.dtype, int]]:
    """A dict that fills, inside lean_backward.keeping_recipes(), with the storages kept for backward (the
    saved tensor's own, or those its recipe holds): their dtype and bytes by address."""
    from blt_lightning.models import lean_backward

    kept, pack = {}, lean_backward._pack

    def counting_pack(t):
        packed = pack(t)
        held = packed.mark.recipe.args if isinstance(packed, lean_backward._Remade) else (packed.tensor,)
        kept.update((x.untyped_storage().data_ptr(), (x.dtype, x.untyped_storage().nbytes()))
                    for x in held if isinstance(x, torch.Tensor))
        return packed

    monkeypatch.setattr(lean_backward, "_pack", counting_pack)
    return kept


# What SLURM sets for a job of one task, bar SLURM_JOB_ID: enough for Lightning to run under its SLURM environment.
SLURM_ONE_TASK = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "blt", "SLURM_PROCID": "0",
                  "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "127.0.0.1"}


WORDS = ["the", "byte", "latent", "patch", "entropy", "model", "über", "naïve", "данные", "字节", "パッチ", "שלום"]


def make_documents(n: int, seed: int = 0) -> list[dict]:
    """Small documents of several scripts, each unique, with sources and languages."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        docs.append({"text": f"doc {i}: {words}.\n", "source": f"src{i % 3}", "lang": ["en", "de", "xx"][i % 3]})
    return docs


def write_jsonl(path: Path, records: list, gz: bool = False) -> Path:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(lines, mtime=0) if gz else lines)
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A JSON-lines file of 240 small documents (about 40 KB)."""
    return write_jsonl(tmp_path / "corpus.jsonl", make_documents(240))


@pytest.fixture
def shards(corpus, tmp_path) -> Path:
    """The corpus as shards: many small ones per split, so several ranks and workers each get some."""
    out = tmp_path / "shards"
    prepare([str(corpus)], out, PrepareOptions(val_fraction=0.2, test_fraction=0.1, shard_bytes=2000, interleave=4),
            progress=False)
    return out


@pytest.fixture(scope="session")
def entropy_checkpoint(tmp_path_factory) -> Path:
    """A stage-one checkpoint written by the CLI: a few steps of the tiny config on a small corpus."""
    from blt_lightning.cli import main

    root = tmp_path_factory.mktemp("stage_one")
    corpus = write_jsonl(root / "corpus.jsonl", make_documents(240))
    main(["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs/entropy/tiny.yaml"),
          "--trainer.default_root_dir", str(root), "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
          "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "2",
          "--data.sources", f"[{corpus}]", "--data.prepare.shard_bytes", "2000",
          "--data.seq_len", "32", "--data.batch_size", "4", "--data.num_workers", "0"])
    return root / "entropy-tiny" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def blt_checkpoint(entropy_checkpoint, tmp_path_factory) -> Path:
    """A stage-two checkpoint written by the CLI: a few steps of the tiny BLT config, patched in monotonic
    mode by the stage-one checkpoint's entropy model."""
    from blt_lightning.cli import main

    root = tmp_path_factory.mktemp("stage_two")
    corpus = write_jsonl(root / "corpus.jsonl", make_documents(240))
    main(["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs/blt/tiny.yaml"),
          "--model.init_args.patching.mode", "monotonic",
          "--model.init_args.entropy_checkpoint", str(entropy_checkpoint),
          "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
          "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1",
          "--data.sources", f"[{corpus}]", "--data.prepare.shard_bytes", "2000",
          "--data.seq_len", "32", "--data.batch_size", "4", "--data.num_workers", "0"])
    return root / "blt-tiny" / "version_0" / "checkpoints" / "last.ckpt"
