"""Errors a command ends with as their message alone: in what the user gave, or a run that diverged. Any other error
shows its traceback (a bug to report)."""


class InputError(Exception):
    """Something the user named (a file, a folder, a shard, a checkpoint) is missing or not what it should be; the
    message names it and says what is wrong."""


class MissingInput(InputError, FileNotFoundError):
    """Nothing where the user said."""


class BadInput(InputError, ValueError):
    """Something there, but not what it should be."""


class Diverged(FloatingPointError):
    """A run's training loss or gradients stopped being finite: a fact about the run, not a bug, so a command ends
    with its message alone (which step, and that the checkpoints written so far are kept)."""
