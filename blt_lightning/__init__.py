"""blt_lightning: the Byte Latent Transformer, trained and evaluated with PyTorch Lightning."""

from .data import ByteShardDataModule
from .entropy_lm import EntropyLM
from .metrics import BitsPerByte

__all__ = ["BitsPerByte", "ByteShardDataModule", "EntropyLM"]
