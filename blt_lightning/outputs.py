"""How the tools write their outputs: never over what an earlier command wrote unless told to, and each
file whole or not at all."""

import io
import os
import sys
from pathlib import Path

from tqdm import tqdm


def check_output_dir(directory: str | os.PathLike, overwrite: bool) -> Path:
    """`directory`, if a command may write its output there: a new or empty directory, or (`overwrite`) one
    that holds files, which the new output may replace or lie mixed with."""
    directory = Path(directory)
    if problem := output_problem(directory, folder=True):
        raise ValueError(problem)
    if not overwrite and directory.is_dir() and any(directory.iterdir()):
        raise ValueError(f"{directory}: not empty; give a new directory, or --overwrite to replace what is there")
    return directory


def make_dirs(directory: Path) -> list[Path]:
    """Make directory and its missing parents; those it made, deepest first (for remove_empty, should what goes
    in them fail)."""
    made = [d for d in (directory, *directory.parents) if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    return made


def remove_empty(directories: list[Path]) -> None:
    """Remove these directories, deepest first, while they are empty."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


def write_atomically(path: Path, text: str) -> None:
    """path's new contents, or (if this is interrupted) its old ones."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def as_umask_allows(path: Path) -> None:
    """Open a file written through a private temporary (0600: safetensors' save_file) to whom a file written by
    open() would be: 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def output_problem(path: str | os.PathLike, folder: bool = False) -> str | None:
    """Why an output cannot go to `path` (a file, or with `folder` a folder), found before any work: a file where
    one of its folders must be, or a folder where the file must be. None: it can."""
    path = Path(path)
    if blocking := next((p for p in path.parents if p.exists() and not p.is_dir()), None):
        return f"{path}: {blocking} is a file, not a folder"
    if path.exists() and path.is_dir() != folder:
        return f"{path}: not a directory" if folder else f"{path} is a directory: name the file to write"
    return None


class _LogLines(io.TextIOBase):
    """Where tqdm draws in a log file: each redraw a line of its own, not a carriage return over the last."""

    def write(self, text: str) -> int:
        if line := text.replace("\r", "").strip():  # tqdm redraws with \r and clears with spaces
            sys.stderr.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def byte_progress(total: int | None, desc: str, enabled: bool = True) -> tqdm:
    """A progress bar over `total` bytes (None: not known) on stderr: redrawn in place on a terminal; in a log
    file (a batch job's stderr, where tqdm alone would draw nothing) a line at the start, every minute and at the
    end."""
    in_a_log = {} if sys.stderr.isatty() else {"file": _LogLines(), "mininterval": 60, "ncols": 100}
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, **in_a_log)
