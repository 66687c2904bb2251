import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, cwd: Path) -> dict:
    """The JSON a benchmark prints, run as a user runs it: by path, from another folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_benchmarks_run_on_the_corpus_that_ships_with_the_repository(tmp_path):
    """A fresh clone has nothing beside it: the benchmarks' default text is data/corpus's."""
    corpus = str(ROOT / "data" / "corpus" / "en_moby_dick.jsonl.gz")
    training = run_bench("training.py", "--models", "blt", "--shapes", "1x64", "--steps", "1", "--warmup", "0",
                         "--threads", "1", cwd=tmp_path)
    assert training["corpus"] == corpus and training["shapes"]["1x64"]["blt"]["bytes_per_s"] > 0
    patching = run_bench("patching.py", "--shapes", "tiny", "--warmup", "0", "--batches", "1", "--seq_len", "64",
                         "--batch_size", "1", cwd=tmp_path)
    assert patching["corpus"] == corpus and patching["shapes"]["tiny"]["total"]["mb_per_s"] > 0


def test_training_bench_runs_its_workers_on_the_glibc_it_is_given(tmp_path):
    """--glibc DIR: the workers run on the C library in DIR (here a copy of this system's), and say so."""
    with open("/proc/self/maps") as maps:
        system = {Path(line.split()[-1]) for line in maps if line.rstrip().endswith(("/libc.so.6",
                                                                                    "/ld-linux-x86-64.so.2"))}
    if {p.name for p in system} != {"libc.so.6", "ld-linux-x86-64.so.2"}:
        pytest.skip("needs glibc on x86-64")
    if os.statvfs(tmp_path).f_flag & os.ST_NOEXEC:
        pytest.skip("the copied loader cannot run from a noexec mount")
    glibc = tmp_path / "glibc"
    glibc.mkdir()
    for library in system:
        shutil.copy(library, glibc / library.name)
    args = ("--models", "blt", "--shapes", "1x64", "--steps", "1", "--warmup", "0", "--threads", "1")
    training = run_bench("training.py", *args, "--glibc", str(glibc), cwd=tmp_path)
    assert training["shapes"]["1x64"]["blt"]["libc"].endswith(f"({glibc / 'libc.so.6'})")
    assert training["libc"] == training["shapes"]["1x64"]["blt"]["libc"]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "training.py"), *args, "--glibc", str(tmp_path)],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"--glibc {tmp_path}: no ld-linux-x86-64.so.2 or libc.so.6 there" in done.stderr
