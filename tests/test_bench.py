import json
import os
import subprocess
import sys
from pathlib import Path

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
