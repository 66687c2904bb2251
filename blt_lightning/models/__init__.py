"""Plain torch.nn models: no Lightning in here."""

from .entropy import EntropyModel, EntropyModelConfig

__all__ = ["EntropyModel", "EntropyModelConfig"]
