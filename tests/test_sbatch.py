"""configs/launch/slurm.sbatch run as the batch script of a one-task job, by bash, with an `srun` that runs its
command: its command line is one this CLI takes, and the run lands in the job's folder."""

import os
import subprocess
import sys
from pathlib import Path

from blt_lightning.prepare import MANIFEST
from conftest import SLURM_ONE_TASK, command_on_path

ROOT = Path(__file__).resolve().parents[1]


def test_the_sbatch_script_trains_into_the_jobs_run_folder(shards, tmp_path):
    srun = command_on_path(tmp_path, "srun", 'while [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"')  # no options
    runs = tmp_path / "runs"
    env = {**os.environ, **SLURM_ONE_TASK, "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_CPUS_PER_TASK": "1", **srun, "RUNS": str(runs), "PYTHON": sys.executable,
           "TRAINER": "configs/trainer/cpu.yaml", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "configs/launch/slurm.sbatch", "configs/entropy/tiny.yaml", "--trainer.max_steps", "2",
         "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false", "--data.sources", "null", "--data.manifest",
         str(shards / MANIFEST), "--data.seq_len", "32", "--data.batch_size", "2", "--data.num_workers", "0",
         "--model.init_args.model.dim", "32", "--model.init_args.model.n_layers", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (runs / "entropy-tiny" / "slurm-4242" / "checkpoints" / "last.ckpt").is_file(), done.stderr[-3000:]
