"""Bad shards are named or skipped, and no rank waits forever for another."""

import dataclasses
import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from blt_lightning.data import iter_documents, read_manifest
from blt_lightning.streams import EvalStream, Shard, ShardError, TrainStream, shard_documents
from blt_lightning.prepare import MANIFEST

ROOT = Path(__file__).resolve().parents[1]


def truncate(path: str) -> None:
    """Cut a shard inside its members (not in the zero blocks that end a tar, which readers skip)."""
    data = Path(path).read_bytes().rstrip(b"\0")
    Path(path).write_bytes(data[: len(data) // 2 + 7])


def test_a_truncated_shard_is_named_or_skipped_and_counted(shards):
    split = read_manifest(str(shards / MANIFEST))["validation"]
    truncate(split[1].url)
    with pytest.raises(ShardError, match=f"{split[1].url}: (corrupt|truncated) shard"):
        list(EvalStream(split, 32, 4, 0, 1, 0))

    with pytest.warns(UserWarning,
                      match=rf"skipped the rest of a bad shard \(1 so far this epoch in this reader\): {split[1].url}"):
        batches = list(EvalStream(split, 32, 4, 0, 1, 0, skip_bad_shards=True))
    # The shard's missing rows come as padding, so every rank still runs the batches it planned.
    assert len(batches) == len(EvalStream(split, 32, 4, 0, 1, 0))
    assert any((b["shard"] == -1).any() for b in batches[:-1])


def test_a_shard_cut_at_a_document_boundary_is_an_error_to_every_reader_of_its_manifest(shards):
    """Such a shard reads as a shorter valid tar: only the manifest's count tells. calibrate reads this way."""
    split = read_manifest(str(shards / MANIFEST))["validation"]
    with tarfile.open(split[0].url) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    last = members[-1][0].name.split(".")[0]
    with tarfile.open(split[0].url, "w") as tar:
        for member, data in members:
            if member.name.split(".")[0] != last:
                tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ShardError, match=f"{split[0].url}: truncated shard, "):
        list(iter_documents([str(shards / MANIFEST)], "validation"))


def test_a_shard_with_a_changed_document_does_not_have_its_manifests_sha256(shards):
    """A tar does not check its members' data: the manifest's sha256 does, once the shard has been read."""
    split = read_manifest(str(shards / MANIFEST))["validation"]
    with tarfile.open(split[1].url) as tar:
        at = next(m.offset_data for m in tar.getmembers() if m.name.endswith(".bin"))  # a document's bytes
    data = bytearray(Path(split[1].url).read_bytes())
    data[at:at + 4] = bytes(b ^ 0x20 for b in data[at:at + 4])
    Path(split[1].url).write_bytes(data)
    assert len(EvalStream(split[:1], 32, 4, 0, 1, 0)) == len(list(EvalStream(split[:1], 32, 4, 0, 1, 0)))
    with pytest.raises(ShardError, match=rf"{split[1].url}: corrupt shard, its sha256 is not the manifest's"):
        list(EvalStream(split, 32, 4, 0, 1, 0))
    with pytest.raises(ShardError, match=rf"{split[1].url}: corrupt shard, its sha256"):
        list(iter_documents([str(shards / MANIFEST)], "validation"))
    with pytest.warns(UserWarning, match=rf"skipped the rest of a bad shard \(1 so far .*{split[1].url}"):
        batches = list(EvalStream(split, 32, 4, 0, 1, 0, skip_bad_shards=True))
    assert len(batches) == len(EvalStream(split, 32, 4, 0, 1, 0))
    # As a shard URL, with no manifest, there is nothing to check it against.
    assert len(list(iter_documents([split[1].url]))) == split[1].documents


def test_a_corrupt_header_after_the_first_member_is_named_not_read_as_the_end_of_the_shard(shards, tmp_path):
    """Python's tarfile stops there without a word; a shard URL has no manifest count to fall short of."""
    url = read_manifest(str(shards / MANIFEST))["validation"][1].url
    documents = list(iter_documents([url]))
    packed = tmp_path / "packed.tar.gz"  # compressed, what follows the end is still zeros once decompressed
    packed.write_bytes(gzip.compress(Path(url).read_bytes()))
    assert list(shard_documents(Shard(str(packed)))) == documents
    with tarfile.open(url) as tar:
        header = tar.getmembers()[len(documents)].offset  # of a member midway
    data = bytearray(Path(url).read_bytes())
    data[header + 148:header + 156] = b"0000000\0"  # its checksum
    Path(url).write_bytes(data)
    with pytest.raises(ShardError, match=rf"{url}: corrupt shard, data after where tarfile found its end"):
        list(iter_documents([url]))


def test_a_corrupt_training_shard_is_named_or_skipped(shards):
    split = read_manifest(str(shards / MANIFEST))["train"]
    Path(split[0].url).write_bytes(b"not a tar file " * 100)
    with pytest.raises(ShardError, match=split[0].url):
        list(TrainStream(split, 16, 2, 0, 1, 0, shuffle_rows=4, mix_shards=len(split), batches_per_epoch=50))
    with pytest.warns(UserWarning, match=split[0].url):
        batches = list(TrainStream(split, 16, 2, 0, 1, 0, 4, len(split), 50, skip_bad_shards=True))
    assert len(batches) == 50 and all(0 not in b["shard"].tolist() for b in batches)


def test_a_pipe_shard_whose_command_fails_is_named_or_skipped(shards):
    """webdataset reports a command's exit status (and so a failed http transfer) only as the stream closes."""
    split = read_manifest(str(shards / MANIFEST))["validation"]
    for shard, url in [(0, f"pipe:cat {shards}/no-such.tar"), (1, f"pipe:cat {split[1].url} && exit 3")]:
        piped = [dataclasses.replace(s, url=url) if i == shard else s for i, s in enumerate(split)]
        with pytest.raises(ShardError, match=rf"^{re.escape(url)}: its stream failed after \d+ documents .*exit"):
            list(EvalStream(piped, 32, 4, 0, 1, 0))
        with pytest.warns(UserWarning, match=rf"skipped the rest of a bad shard \(1 so far .*{re.escape(url)}"):
            batches = list(EvalStream(piped, 32, 4, 0, 1, 0, skip_bad_shards=True))
        assert len(batches) == len(EvalStream(split, 32, 4, 0, 1, 0))


def test_a_reader_whose_every_shard_is_bad_stops_instead_of_spinning(shards):
    split = read_manifest(str(shards / MANIFEST))["train"][:1]
    Path(split[0].url).write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(ShardError, match="no document could be read"):
        list(TrainStream(split, 16, 2, 0, 1, 0, 4, 1, 5, skip_bad_shards=True))


def ddp_fit(root: Path, data_args: list[str]) -> subprocess.CompletedProcess:
    """Two ranks of real DDP on CPU through the CLI and Lightning's launcher, a few steps (probes.py importable)."""
    args = [sys.executable, "-m", "blt_lightning", "fit", "--config", str(ROOT / "configs/entropy/tiny.yaml"),
            "--trainer.default_root_dir", str(root), "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--data.sources", "null", "--data.seq_len", "32",
            "--data.batch_size", "2", "--data.num_workers", "0", "--model.init_args.model.dim", "16",
            "--model.init_args.model.n_layers", "1", *data_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run(args, capture_output=True, text=True, timeout=240, env=env)


def test_ranks_with_unequal_shards_or_a_bad_shard_do_not_hang(shards, tmp_path):
    manifest = json.loads((shards / MANIFEST).read_text())["splits"]
    train = [str(shards / s["path"]) for s in manifest["train"]["shards"]][:5]  # 3 for rank 0, 2 for rank 1
    val = [str(shards / s["path"]) for s in manifest["validation"]["shards"]][:3]
    urls = ["--data.train_shards", json.dumps(train), "--data.val_shards", json.dumps(val)]
    run = ddp_fit(tmp_path / "unequal", urls + ["--data.batches_per_epoch", "3"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 4: validation bpb" in run.stdout

    truncate(val[2])  # rank 0's second validation shard: rank 0 fails, rank 1 must not wait for it forever
    run = ddp_fit(tmp_path / "bad", urls + ["--data.batches_per_epoch", "3"])
    assert run.returncode != 0 and f"blt-lightning: {val[2]}: corrupt shard" in run.stderr  # a message, last


def test_a_sigterm_to_one_rank_in_the_sanity_check_saves_on_both_after_the_first_step(shards, tmp_path):
    """Lightning's handler would end the sanity check on rank 1 alone, and rank 0 would wait for it forever;
    CheckpointOnTerminate's, from the sanity check on, lets both ranks train the first step and save it."""
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(json.dumps({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"monitor": None}},
        {"class_path": "blt_lightning.callbacks.LastCheckpoint"},
        {"class_path": "blt_lightning.callbacks.CheckpointOnTerminate"},
        {"class_path": "probes.SendSignalInTheSanityCheck", "init_args": {"signal": "SIGTERM", "rank": 1}}]}}))
    run = ddp_fit(tmp_path, ["--data.manifest", str(shards / MANIFEST), "--config", str(callbacks),
                             "--trainer.num_sanity_val_steps", "2", "--trainer.limit_val_batches", "3"])
    assert run.returncode == 128 + signal.SIGTERM, run.stderr[-3000:]
    assert "SIGTERM: saved" in run.stderr + run.stdout
    assert torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=False)["global_step"] == 1
