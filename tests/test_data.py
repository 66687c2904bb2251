import functools
import http.server
import itertools
import json
import multiprocessing.forkserver
import os
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from blt_lightning.data import ByteShardDataModule, expand_urls, read_manifest
from blt_lightning.prepare import MANIFEST, PrepareOptions
from blt_lightning.streams import EvalStream, Shard, TrainStream, pack_rows, shard_documents
from blt_lightning.vocab import BOS, EOS, PAD, decode, encode


def documents_of(shards: list[Shard]) -> list[bytes]:
    return [d for s in shards for d in shard_documents(s)]


def test_packing_round_trips_every_document():
    docs = [b"first", b"", "second \u00fc".encode(), b"x" * 23, b"\xff\x00"]
    for seq_len in (1, 4, 7, 64):
        rows = [row for _, row, _ in pack_rows(((0, d, {}) for d in docs), seq_len, pad_last=True)]
        assert all(len(r) == seq_len + 1 for r in rows)
        assert all(torch.equal(a[-1:], b[:1]) for a, b in zip(rows, rows[1:])), "rows overlap by one id"
        stream = torch.cat([rows[0]] + [r[1:] for r in rows[1:]])
        expected = torch.cat([encode(d) for d in docs])
        assert torch.equal(stream[: len(expected)], expected)
        assert (stream[len(expected) :] == PAD).all()
        # Cut at the markers, the stream gives back each document's bytes.
        ends = (stream == EOS).nonzero().flatten().tolist()
        starts = (stream == BOS).nonzero().flatten().tolist()
        assert [decode(stream[s:e]) for s, e in zip(starts, ends)] == docs


def test_eval_stream_covers_each_row_once_and_rows_do_not_depend_on_readers(shards):
    split = read_manifest(str(shards / MANIFEST))["validation"]
    seq_len, batch_size = 16, 3

    def rows_by_shard(world_size, workers):
        seen, batches_per_rank = {}, []
        for rank in range(world_size):
            stream = EvalStream(split, seq_len, batch_size, rank, world_size, workers)
            batches = list(DataLoader(stream, batch_size=None, num_workers=workers))
            assert len(batches) == len(stream)
            batches_per_rank.append(len(batches))
            for b in batches:
                for shard, number, ids in zip(b["shard"].tolist(), b["row"].tolist(), b["ids"]):
                    if shard >= 0:
                        assert (shard, number) not in seen, "a row was read twice"
                        seen[(shard, number)] = ids
        assert len(set(batches_per_rank)) == 1, "ranks ran different numbers of batches"
        return seen

    single = rows_by_shard(1, 0)
    assert rows_by_shard(1, 0).keys() == single.keys()
    first, again = (list(EvalStream(split, seq_len, batch_size, 0, 1, 0)) for _ in range(2))
    assert all(torch.equal(a["ids"], b["ids"]) for a, b in zip(first, again)), "the order changed between runs"
    assert len(single) == sum(s.rows(seq_len) for s in split)
    spread = rows_by_shard(2, 2)
    assert single.keys() == spread.keys() and all(torch.equal(single[k], spread[k]) for k in single)
    # Together the rows hold every document of the split.
    for index, shard in enumerate(split):
        rows = [single[(index, n)] for n in range(shard.rows(seq_len))]
        stream = torch.cat([rows[0]] + [r[1:] for r in rows[1:]])
        expected = torch.cat([encode(d) for d in shard_documents(shard)])
        assert torch.equal(stream[: len(expected)], expected)


def test_training_stream_is_seeded_reproducible_and_equal_across_ranks(shards):
    split = read_manifest(str(shards / MANIFEST))["train"]

    def batches(rank, epoch=0, seed=0, workers=0):
        stream = TrainStream(split, 16, 4, rank, 2, seed, shuffle_rows=8, mix_shards=2, batches_per_epoch=7)
        stream.epoch = epoch
        return list(DataLoader(stream, batch_size=None, num_workers=workers))

    rank0, rank1 = batches(0), batches(1)
    assert len(rank0) == len(rank1) == 7
    assert all(torch.equal(a["ids"], b["ids"]) for a, b in zip(rank0, batches(0)))
    assert not torch.equal(rank0[0]["ids"], batches(0, epoch=1)[0]["ids"])
    assert not torch.equal(rank0[0]["ids"], batches(0, seed=1)[0]["ids"])
    shards0 = {s for b in rank0 for s in b["shard"].tolist()}
    shards1 = {s for b in rank1 for s in b["shard"].tolist()}
    assert shards0 and shards1 and not shards0 & shards1, "two ranks read the same shard"
    with_workers = batches(0, workers=2)
    assert len(with_workers) == 7
    assert all(b["ids"].shape == (4, 17) for b in with_workers)


def test_resuming_with_other_workers_or_batch_size_warns_that_the_batches_change(shards):
    """Each worker reads its own shards, so the worker count shapes the stream as the batch size does (0 and 1
    workers are the same: one reader)."""

    def loader(**options):
        data = ByteShardDataModule(manifest=str(shards / MANIFEST), seq_len=16, **{"batch_size": 4, **options})
        data.setup("fit")
        return data.train_dataloader()

    saved = loader(num_workers=0).state_dict()
    for options, changed in [({"num_workers": 2}, "workers"), ({"batch_size": 8}, "batch_size")]:
        with pytest.warns(UserWarning, match=rf"different training data settings \([^)]*\b{changed}\b"):
            loader(**options).load_state_dict(saved)
    limited = loader()
    limited.limit_batches = lambda: 2  # a trainer's limit_train_batches: epochs of 2 batches
    with pytest.warns(UserWarning, match=r"different training data settings \(limit_train_batches\)"):
        limited.load_state_dict(saved)
    earlier_version = {**saved, "layout": {k: v for k, v in saved["layout"].items() if k != "workers"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader(num_workers=1).load_state_dict(saved)
        loader(num_workers=0).load_state_dict(earlier_version)


def test_datamodule_from_urls_and_manifest(shards, tmp_path):
    pattern = str(shards / "validation-{000000..000001}.tar")
    assert expand_urls(pattern) == [str(shards / "validation-000000.tar"), str(shards / "validation-000001.tar")]
    dm = ByteShardDataModule(manifest=str(shards / MANIFEST), val_shards=f"pipe:cat {pattern}", seq_len=16,
                             batch_size=2)
    dm.setup("fit")
    assert [s.url for s in dm.shards["validation"]] == [f"pipe:cat {shards}/validation-000000.tar",
                                                        f"pipe:cat {shards}/validation-000001.tar"]
    piped = documents_of(dm.shards["validation"])
    assert piped == documents_of(read_manifest(str(shards / MANIFEST))["validation"][:2])
    batch = next(iter(dm.train_dataloader()))
    assert batch["ids"].shape == (2, 17) and batch["doc_ids"].shape == (2, 17)
    only_train = ByteShardDataModule(train_shards=pattern)
    only_train.setup("test")
    with pytest.raises(ValueError, match="no test shards"):
        only_train.test_dataloader()


def test_rows_do_not_keep_their_document_alive():
    (_, row, _), *_ = pack_rows([(0, b"x" * 100_000, {})], 8, pad_last=False)
    assert row.untyped_storage().nbytes() == 9 * 8


def test_datamodule_prepares_sources_once(corpus, tmp_path):
    dm = ByteShardDataModule(sources=[str(corpus)], shard_dir=str(tmp_path / "prepared"), seq_len=16, batch_size=2)
    dm.prepare_data()
    manifest = tmp_path / "prepared" / MANIFEST
    first = manifest.stat().st_mtime_ns
    dm.prepare_data()
    assert manifest.stat().st_mtime_ns == first, "prepared again although nothing changed"
    dm.setup("fit")
    assert dm.shards["train"] and dm.shards["validation"]


def test_a_source_edited_to_the_same_size_is_prepared_again(tmp_path):
    source = tmp_path / "a.txt"
    source.write_text("version A of a document\n" * 20)
    dm = ByteShardDataModule(sources=[str(source)], shard_dir=str(tmp_path / "prepared"), seq_len=16, batch_size=2,
                             prepare=PrepareOptions(val_fraction=0.0, test_fraction=0.0))
    dm.prepare_data()
    os.utime(source, ns=(1, 1))  # an mtime of its own, however coarse the filesystem's clock
    source.write_text("version B of a document\n" * 20)
    dm.prepare_data()
    shards = read_manifest(str(tmp_path / "prepared" / MANIFEST))["train"]
    assert b"version B" in b"".join(d for s in shards for d in shard_documents(s))


def test_a_manifest_in_a_folder_named_like_a_url_scheme_reads(shards, tmp_path, monkeypatch):
    """Its shards' paths are made absolute: relative, `run:1/train-000000.tar` reads as a URL of scheme run."""
    shutil.copytree(shards, tmp_path / "run:1")
    monkeypatch.chdir(tmp_path)
    split = read_manifest("run:1/manifest.json")["validation"]
    assert len(list(EvalStream(split, 32, 4, 0, 1, 0))) == len(EvalStream(split, 32, 4, 0, 1, 0))


def test_too_few_shards_for_the_readers_is_a_clear_error(shards):
    dm = ByteShardDataModule(train_shards=str(shards / "train-000000.tar"), num_workers=2)
    dm.setup("fit")
    with pytest.raises(ValueError, match="1 training shards cannot feed 2 readers"):
        dm.train_dataloader()


def test_a_missing_manifest_is_a_clear_error(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="no manifest here"):
        ByteShardDataModule(manifest=str(tmp_path / "none.json")).setup("fit")
    with pytest.raises(ValueError, match="shards: a directory; give the manifest.json in it"):
        ByteShardDataModule(manifest=str(shards)).setup("fit")
    no_test = tmp_path / "no_test.json"
    manifest = json.loads((shards / MANIFEST).read_text())
    del manifest["splits"]["test"]
    no_test.write_text(json.dumps(manifest))
    data = ByteShardDataModule(manifest=str(no_test))
    data.setup("test")
    with pytest.raises(ValueError, match=f"no test shards: {no_test} has none, so name them"):
        data.test_dataloader()


@pytest.mark.parametrize("text", ["{not json", "5", "[]", '{"splits": []}', '{"splits": {"train": {}}}'])
def test_a_file_that_is_not_a_manifest_is_a_clear_error(tmp_path, corpus, text):
    path = tmp_path / "manifest.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}: not a manifest written by `blt-lightning prepare`"):
        ByteShardDataModule(manifest=str(path)).setup("fit")
    # Preparing sources into its folder: an error too, where the manifest is no JSON object (one that is, with
    # other inputs or options, is an earlier preparation's, which this one replaces).
    if not text.startswith("{\""):
        with pytest.raises(ValueError, match=f"{path}: not a manifest written by `blt-lightning prepare`"):
            ByteShardDataModule(sources=[str(corpus)], shard_dir=str(tmp_path)).prepare_data()
        assert path.read_text() == text


def test_streams_run_in_spawned_workers(shards):
    """Spawned workers (the default on macOS and Windows) pickle the stream: it must hold no closures."""
    split = read_manifest(str(shards / MANIFEST))
    train = TrainStream(split["train"], 16, 2, 0, 1, 0, shuffle_rows=4, mix_shards=2, batches_per_epoch=4)
    evaluation = EvalStream(split["validation"], 16, 2, 0, 1, 2)
    spawned = [list(DataLoader(s, batch_size=None, num_workers=2, multiprocessing_context="spawn"))
               for s in (train, evaluation)]
    forked = [list(DataLoader(s, batch_size=None, num_workers=2)) for s in (train, evaluation)]
    for a, b in zip(spawned, forked):
        assert len(a) == len(b) > 0
        assert all(torch.equal(x["ids"], y["ids"]) for x, y in zip(a, b))


needs_forkserver = pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(),
                                      reason="workers fork from a forkserver")


@needs_forkserver
@pytest.mark.parametrize("main, loaded", [(["-m", "trainer"], []), (["train.py"], ["blt_lightning.data", "lightning"])])
def test_workers_fork_from_a_server_with_lightning_only_where_they_run_the_main_module_again(tmp_path, main, loaded):
    """Workers read shards; Lightning's imports would cost every run seconds of CPU, and each worker memory.
    But a worker runs the main module's top level again before it starts (as spawned processes do) when that
    is a script or a `python -m` module, not a package's __main__ (`python -m blt_lightning`): there the
    forkserver has imported it (with the CLI), rather than every worker."""
    program = ("from torch.utils.data import DataLoader\n"
               "from blt_lightning.workers import worker_options\n"
               "from worker_probe import LoadedModules\n"
               "if __name__ == '__main__':\n"
               "    names = ['lightning', 'pytorch_lightning', 'blt_lightning.data']\n"
               "    print(list(DataLoader(LoadedModules(names), batch_size=None, **worker_options(1))))\n")
    (tmp_path / "train.py").write_text(program)
    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer/__main__.py").write_text(program)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    run = subprocess.run([sys.executable, *main], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == repr([loaded])


def test_workers_run_the_main_module_again_for_a_script_or_module_not_a_packages_main(tmp_path):
    (tmp_path / "trainer").mkdir()
    ask = "from blt_lightning.workers import workers_rerun_main\nprint(workers_rerun_main())\n"
    for path in ("train.py", "trainer/__main__.py"):
        (tmp_path / path).write_text(ask)
    answers = [subprocess.run([sys.executable, *main], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
               for main in (["train.py"], ["-m", "train"], ["-m", "trainer"], ["-c", ask])]
    assert [a.strip() for a in answers] == ["True", "True", "False", "False"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http URLs with curl, which is not installed")
def test_shards_stream_over_http(shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/validation-000000.tar"
        dm = ByteShardDataModule(val_shards=[url], seq_len=16, batch_size=2)
        dm.setup("validate")
        assert documents_of(dm.shards["validation"]) == documents_of([Shard(str(shards / "validation-000000.tar"))])
        assert next(iter(dm.val_dataloader()))["ids"].shape == (2, 17)
    finally:
        server.shutdown()


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="workers take their signals with sigwaitinfo")
def test_workers_outlive_a_schedulers_signals_and_end_on_the_loaders(shards):
    """SLURM signals every process of a job: the forkserver and the workers carry on (the trainer acts on the
    signal after a batch), but a worker ends when the trainer itself sends SIGTERM (as the DataLoader does
    to a worker that does not stop)."""
    dm = ByteShardDataModule(manifest=str(shards / MANIFEST), seq_len=16, batch_size=2, num_workers=2,
                             batches_per_epoch=100)
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    next(batches)
    workers = batches._workers
    pids = [multiprocessing.forkserver._forkserver._forkserver_pid] + [w.pid for w in workers]
    for name in ("SIGUSR1", "SIGTERM"):  # from another process, as a scheduler sends them
        subprocess.run([sys.executable, "-c", f"import os, signal\nfor p in {pids}: os.kill(p, signal.{name})"],
                       check=True)
    assert len(list(itertools.islice(batches, 20))) == 20  # more than the workers had fetched ahead
    os.kill(workers[0].pid, signal.SIGTERM)
    workers[0].join(timeout=10)
    assert workers[0].exitcode == 0 and workers[1].is_alive()
    batches._shutdown_workers()
    assert not workers[1].is_alive()
