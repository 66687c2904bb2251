"""A dataset for DataLoader workers to report on. Its module imports torch only, so that what a worker
reports having loaded is the worker's own doing; and with IMPORTED_BY set, each process that imports the
module itself (rather than inheriting it from the process it was forked from) appends its id to that file."""

import os
import sys

from torch.utils.data import IterableDataset

if "IMPORTED_BY" in os.environ:
    with open(os.environ["IMPORTED_BY"], "a") as log:
        log.write(f"{os.getpid()}\n")


class LoadedModules(IterableDataset):
    """Yields once: which of `names` are loaded in the process that iterates it."""

    def __init__(self, names: list[str]):
        self.names = names

    def __iter__(self):
        yield sorted(name for name in self.names if name in sys.modules)
