"""DataLoader worker processes: how they start, and how they end with the trainer."""

import functools
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import select
import signal
import sys
import threading
import time

# What schedulers send every process of a job (SLURM: SIGTERM, or SIGUSR1 before the time limit). The
# trainer acts on them after a batch and needs its workers, and their forkserver, until then.
STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1} if hasattr(signal, "SIGUSR1") else set()


def worker_options(num_workers: int) -> dict:
    """DataLoader arguments for `num_workers` worker processes, started from a forkserver.

    Forking the trainer itself is not safe: it runs threads (gloo's, TensorBoard's writer), and a child
    forked while another thread holds an interpreter lock can hang before it runs a line (CPython's
    fork-with-threads hazard; seen here as a rare hang of a DDP run). The forkserver is a fresh,
    single-threaded process that has imported the data pipeline once, so workers still start fast.
    """
    if num_workers == 0:
        return {}
    context = start_forkserver()
    if context is None:  # Windows: spawned, the trainer's children
        return {"num_workers": num_workers}
    return {"num_workers": num_workers, "multiprocessing_context": context,
            "worker_init_fn": functools.partial(start_worker, os.getpid())}


def start_forkserver() -> multiprocessing.context.BaseContext | None:
    """The forkserver context, its server started (once per process) importing the data pipeline; None where
    there are no forkservers. Its imports take seconds: started before the loaders are made
    (ByteShardDataModule.setup), they overlap the trainer's own setup."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    # What workers run, without Lightning. But where each worker runs the main module again before it starts
    # (as spawned processes do), that imports Lightning: through the CLI (`blt-lightning`), or the imports of a
    # script that trains with this DataModule. The server imports the CLI once rather than every worker that.
    # Only our modules: a user's module imported in the server would run with other arguments and another
    # process name than in the workers.
    # (The server's own preload of "__main__" is never given the script's path, up to Python 3.13 at least.)
    context.set_forkserver_preload(["blt_lightning.streams"] + ["blt_lightning.cli"] * workers_rerun_main())
    # Started with the stop signals blocked, the forkserver, its resource tracker and the workers it forks
    # never see them. (Starting the tracker unblocks SIGTERM in this thread: blocked again after it.)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        multiprocessing.resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return context


def workers_rerun_main() -> bool:
    """Whether each worker runs the main module's top level again before it starts, as multiprocessing does for
    a script or a `python -m` module, but not for a package's __main__ (`python -m blt_lightning`) or `-c`."""
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is not None:
        return not (spec.name == "__main__" or spec.name.endswith(".__main__"))
    return bool(getattr(main, "__file__", None))


def start_worker(trainer_pid: int, worker: int) -> None:
    threading.Thread(target=exit_with, args=(trainer_pid,), daemon=True).start()
    if hasattr(signal, "sigwaitinfo"):  # not on macOS: there the stop signals stay blocked
        threading.Thread(target=obey_trainer, args=(trainer_pid,), daemon=True).start()


def obey_trainer(pid: int) -> None:
    """Take the stop signals, which arrive blocked, and exit on the trainer's own SIGTERM only (the
    DataLoader ending a worker that does not stop)."""
    while True:
        received = signal.sigwaitinfo(STOP_SIGNALS)
        if received.si_signo == signal.SIGTERM and received.si_pid == pid:
            os._exit(0)


def exit_with(pid: int) -> None:
    """Exit when process `pid` ends. A forkserver's child is not the trainer's: PyTorch's own check (has
    the parent changed?) would not see a killed trainer, and its workers would live on."""
    try:
        watch = select.poll()
        watch.register(os.pidfd_open(pid), select.POLLIN)  # readable once the process has ended
        watch.poll()
    except (AttributeError, OSError):  # no pidfd (macOS, or an old Linux kernel): poll
        while True:
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, PermissionError):  # gone (its pid may be another user's process now)
                break
            time.sleep(1)
    os._exit(0)
