"""How the tools write their outputs: never over what an earlier command wrote unless told to, and each
file whole or not at all."""

import os
from pathlib import Path


def check_output_dir(directory: str | os.PathLike, overwrite: bool) -> Path:
    """`directory`, if a command may write its output there: a new or empty directory, or (`overwrite`) one
    that holds files, which the new output may replace or lie mixed with."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    if not overwrite and directory.is_dir() and any(directory.iterdir()):
        raise ValueError(f"{directory}: not empty; give a new directory, or --overwrite to replace what is there")
    return directory


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
