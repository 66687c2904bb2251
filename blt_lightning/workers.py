"""DataLoader worker processes: how they start, and how they end with the trainer."""

import functools
import multiprocessing
import os
import select
import signal
import threading
import time


def worker_options(num_workers: int) -> dict:
    """DataLoader arguments for `num_workers` worker processes, started from a forkserver.

    Forking the trainer itself is not safe: it runs threads (gloo's, TensorBoard's writer), and a child
    forked while another thread holds an interpreter lock can hang before it runs a line (CPython's
    fork-with-threads hazard; seen here as a rare hang of a DDP run). The forkserver is a fresh,
    single-threaded process that has imported the data pipeline once, so workers still start fast.
    """
    if num_workers == 0:
        return {}
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows: spawned, the trainer's children
        return {"num_workers": num_workers}
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["blt_lightning.data"])  # what workers run
    return {"num_workers": num_workers, "multiprocessing_context": context,
            "worker_init_fn": functools.partial(start_worker, os.getpid())}


def start_worker(trainer_pid: int, worker: int) -> None:
    # Schedulers signal every process of a job (SLURM: SIGTERM, or SIGUSR1 before the time limit). The
    # trainer acts on it after a batch and needs its workers until then; they stop when the trainer does.
    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)
    threading.Thread(target=exit_with, args=(trainer_pid,), daemon=True).start()


def exit_with(pid: int) -> None:
    """Exit when process `pid` ends. A forkserver's child is not the trainer's: PyTorch's own check (has
    the parent changed?) would not see a killed trainer, and its workers would live on."""
    try:
        select.select([os.pidfd_open(pid)], [], [])  # readable once the process has ended
    except (AttributeError, OSError):  # no pidfd (macOS, or an old Linux kernel): poll
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(1)
    os._exit(0)
