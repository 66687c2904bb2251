"""blt_lightning: the Byte Latent Transformer, trained and evaluated with PyTorch Lightning."""

from .blt_lm import BLTLM
from .data import ByteShardDataModule
from .entropy_lm import EntropyLM
from .metrics import BitsPerByte

__all__ = ["BLTLM", "BitsPerByte", "ByteShardDataModule", "EntropyLM"]
