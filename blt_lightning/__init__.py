"""blt_lightning: the Byte Latent Transformer, trained and evaluated with PyTorch Lightning."""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .blt_lm import BLTLM
    from .data import ByteShardDataModule
    from .entropy_lm import EntropyLM
    from .metrics import BitsPerByte

# The module each public name lives in, imported on first use: `blt_lightning.models` (plain torch.nn),
# `blt_lightning.patching` and the tokenizer then load without Lightning, ~150 MB and seconds less for a
# process that only runs a model.
_MODULE_OF = {"BLTLM": ".blt_lm", "BitsPerByte": ".metrics", "ByteShardDataModule": ".data", "EntropyLM": ".entropy_lm"}

__all__ = ["BLTLM", "BitsPerByte", "ByteShardDataModule", "EntropyLM"]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
