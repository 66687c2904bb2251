"""Checkpoints written atomically: a kill during a save leaves the previous checkpoint as it was.

Lightning's own writer stages the file in the system's temporary directory and then moves it, which
is a copy (not atomic) when that directory is on another filesystem than the checkpoints, as on
clusters with node-local /tmp. Here the file is staged beside its destination and renamed over it.
"""

import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transactions are what there is
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before it takes the name: a crash cannot leave a torn file named path
        os.replace(partial, path)
        if os.name == "posix":  # the rename on disk too: after a power cut, path is the new file or the old one
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
