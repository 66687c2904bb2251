"""Either stage's LightningModule back from its checkpoint, for evaluation, sampling or fine-tuning."""

from pathlib import Path

import torch

from .patcher import CARRIED_ENTROPY_MODEL
from .training import ByteLMModule


def load_lm(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> ByteLMModule:
    """The EntropyLM or BLTLM a checkpoint was saved from, with its weights, in eval mode. A stage-two
    checkpoint brings its own entropy model: the stage-one file it was trained with need not exist."""
    from .blt_lm import BLTLM
    from .entropy_lm import EntropyLM

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here")
    try:
        header = torch.load(path, map_location="meta", weights_only=False)
    except Exception as error:
        raise ValueError(f"{path}: not a checkpoint of this project: it does not load ({error})") from None
    hparams = header.get("hyper_parameters") if isinstance(header, dict) else None
    module_class = {cls.__name__: cls for cls in (EntropyLM, BLTLM)}.get(
        str((hparams or {}).get("_class_path")).rsplit(".", 1)[-1])
    if module_class is None:
        raise ValueError(f"{path}: not a checkpoint of `blt-lightning fit` "
                         "(no EntropyLM or BLTLM in its hyperparameters)")
    overrides = {}
    if hparams.get("entropy_checkpoint") and CARRIED_ENTROPY_MODEL in header:
        overrides["entropy_checkpoint"] = str(path)  # the entropy model it carries, not the file it was trained with
    return module_class.load_from_checkpoint(path, map_location=map_location, **overrides).eval()
