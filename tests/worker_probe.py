"""A dataset for DataLoader workers to report on. Its module imports torch only, so that what a worker
reports having loaded is not this module's doing."""

import sys

from torch.utils.data import IterableDataset


class LoadedModules(IterableDataset):
    """Yields once: which of `names` are loaded in the process that iterates it."""

    def __init__(self, names: list[str]):
        self.names = names

    def __iter__(self):
        yield sorted(name for name in self.names if name in sys.modules)
