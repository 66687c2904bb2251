"""Errors a command ends with as their message alone: in what the user gave, or a run that diverged. Any other error
shows its traceback (a bug to report)."""

import json
import re
from pathlib import Path


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


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in the file `path`, which should hold `what` (the error says it does not)."""
    try:
        found = json.loads(path.read_text())
    except ValueError as error:  # not JSON, or not text
        raise BadInput(f"{path}: not {what} ({error})") from None
    if not isinstance(found, dict):
        raise BadInput(f"{path}: not {what} (a JSON object is expected)")
    return found


def weights_misfit(error: RuntimeError) -> str:
    """torch's load_state_dict error (a line per problem, every key named: hundreds of lines for a model of another
    shape) in one line: how many tensors are missing, unexpected or of other shapes, and the first of each."""
    lines = [line.strip() for line in str(error).splitlines()[1:]]
    parts = []
    for kind, what in (("Missing", "missing"), ("Unexpected", "unexpected")):
        for line in lines:
            if line.startswith(f"{kind} key(s)") and (keys := re.findall(r'"([^"]+)"', line)):
                parts.append(f"{len(keys)} {what} (first {keys[0]})")
    size = r"torch\.Size\((\[.*?\])\)"
    shapes = [re.match(rf"size mismatch for (\S+): .*?{size} from checkpoint, .*?{size}", line) for line in lines]
    if shapes := [m for m in shapes if m]:
        name, saved, here = shapes[0].groups()
        parts.insert(0, f"{len(shapes)} of another shape (first {name}: {saved} there, {here} here)")
    return ", ".join(parts) or str(error).splitlines()[0]
