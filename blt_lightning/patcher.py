"""The patcher: a frozen stage-one entropy model plus a PatchingConfig, shared by stage two, generation
and evaluation.

Entropies are computed with an attention window: the model's sliding window, or, for a model without
one, the row length it was trained on. A position thus attends to up to that many earlier bytes of its
own document at every layer, however long the document, as it did in training. The same window
makes a KV cache exact: streaming a document through the model a chunk (or a byte) at a time gives the
entropies of one pass over the whole of it, so the incremental patcher decides what the batch one does.
"""

import hashlib
from dataclasses import asdict
from pathlib import Path

import torch

from .errors import weights_misfit
from .models import EntropyModel, EntropyModelConfig
from .models.entropy import entropy_of
from .patching import ENTROPY_MODES, Patches, PatchingConfig, patch, spacelike
from .vocab import BOS, PAD

CARRIED_ENTROPY_MODEL = "entropy_model"  # the key under which a stage-two checkpoint describes its entropy model


def carried_entropy_model(config: EntropyModelConfig, context: int) -> dict:
    """What a stage-two checkpoint holds under CARRIED_ENTROPY_MODEL (its weights are under entropy_model.)."""
    return {"config": asdict(config), "context": context}


def load_entropy_model(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> tuple[EntropyModel, int]:
    """The frozen entropy model of a checkpoint, and the row length it was trained on: a stage-one checkpoint,
    or a stage-two one (which carries the entropy model that patched it)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no entropy model checkpoint here "
                                "(train one: blt-lightning fit --config configs/entropy/tiny.yaml)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # not a torch file, truncated, or pickled from code that is gone
        raise ValueError(f"{path}: not a stage-one (EntropyLM) checkpoint: it does not load ({error})") from None
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    carried = ckpt.get(CARRIED_ENTROPY_MODEL) if isinstance(ckpt, dict) else None
    if carried is not None:  # stage two's: its config and context as saved by BLTLM, its weights under entropy_model.
        config, context, prefix = EntropyModelConfig(**carried["config"]), carried["context"], "entropy_model."
    else:
        config, context, prefix = hparams.get("model"), hparams.get("seq_len"), "model."
        if str(hparams.get("_class_path")).endswith("BLTLM"):
            raise ValueError(f"{path}: a stage-two (BLTLM) checkpoint of a model patched without an entropy "
                             "model, so it carries none: give a stage-one (EntropyLM) checkpoint")
        if isinstance(config, dict):  # LightningCLI saves the init arguments as the config's plain values
            try:
                config = EntropyModelConfig(**config)
            except TypeError:
                config = None
        if not isinstance(config, EntropyModelConfig) or context is None:
            raise ValueError(f"{path}: not a stage-one (EntropyLM) checkpoint, "
                             "nor a stage-two one with an entropy model")
    with torch.device(map_location):  # real weights go in, whatever default device is in force
        model = EntropyModel(config)
    weights = {k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(f"{path}: its weights do not fit its entropy model config: {weights_misfit(error)}") from None
    model.requires_grad_(False)
    return model.eval(), context


def weights_sha256(model: torch.nn.Module) -> str:
    """A fingerprint of a model's weights (names, shapes and values): which entropy model computed the entropies
    a manifest stores. Floating weights count as rounded to bfloat16, so the copy a bf16-true run carries in its
    checkpoints is the model it was given."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.is_floating_point():
            tensor = tensor.to(torch.bfloat16)
        digest.update(f"{name} {list(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def entropy_window(config: EntropyModelConfig, context: int | None) -> int:
    """Ids a position sees, itself included, when an entropy model of `config` computes entropies: its sliding
    window, or the row length it was trained on, whichever is shorter."""
    windows = [w for w in (config.sliding_window, context) if w]
    if not windows:
        raise ValueError("the entropy model has no sliding window: give the context it was trained with")
    return min(windows)


class Patcher:
    def __init__(self, config: PatchingConfig, model: EntropyModel | None = None, context: int | None = None):
        """Patches for batches of rows; `model` (with the row length `context` it was trained on) is needed
        for the entropy modes."""
        if config.needs_entropies and model is None:
            raise ValueError(f"{config.mode} patching needs an entropy model")
        self.config, self.model = config, model
        self.window = entropy_window(model.config, context) if model is not None else None

    @torch.no_grad()
    def entropies(self, ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] next-byte entropies of rows of ids [B, L]; a row's never depend on another row."""
        return self.model.entropies(ids, doc_ids, self.window)

    def __call__(self, ids: torch.Tensor, doc_ids: torch.Tensor | None = None, entropies: torch.Tensor | None = None,
                 num_patches: int | None = None) -> Patches:
        """Patches of rows of ids [B, L]; entropies [B, L] (stored with the data, say) are computed when
        the mode needs them and none are given."""
        if self.config.needs_entropies and entropies is None:
            entropies = self.entropies(ids, doc_ids)
        return patch(ids, self.config, entropies, doc_ids, num_patches)

    def incremental(self) -> "IncrementalPatcher":
        return IncrementalPatcher(self)


class IncrementalPatcher:
    """Patch starts decided one id at a time, for generation: the decisions `patch_starts` makes for the
    whole row, with the entropy model advanced through a KV cache. Whether an id starts a patch depends
    only on what came before it, so it is known before the id is chosen."""

    def __init__(self, patcher: Patcher):
        self.patcher, self.config = patcher, patcher.config
        self.cache = None
        self.position = 0
        self.segment_offset = 0  # distance from the start of the current segment
        self.patch_offset = 0  # distance from the latest patch start the rules made (before max_patch_length cuts)
        self.previous_ids: list[int] = []  # the last two ids, oldest first
        self.previous_entropies: list[float] = []  # H of the last two positions, oldest first
        self.previous_pad = True

    def next_starts_patch(self, next_id: int) -> bool:
        """Whether `next_id`, appended now, would start a patch. Only earlier positions are read, except
        that a BOS or the first padding id begins a segment."""
        return self._decide(next_id)[2]

    def append(self, next_id: int) -> bool:
        """Feed the next id; returns whether it starts a patch."""
        self.segment_offset, self.patch_offset, starts = self._decide(next_id)
        if self.config.needs_entropies:
            self.previous_entropies = (self.previous_entropies + [self._entropy(next_id)])[-2:]
        self.previous_ids = (self.previous_ids + [next_id])[-2:]
        self.previous_pad = next_id == PAD
        self.position += 1
        return starts

    def _decide(self, next_id: int) -> tuple[int, int, bool]:
        """(segment offset, patch offset, starts a patch) of `next_id`, as `patch_starts` decides."""
        first = self.position == 0 or next_id == BOS or (next_id == PAD) != self.previous_pad
        offset = 0 if first else self.segment_offset + 1
        rule_start = first or (next_id != PAD and (offset == 1 or (offset >= 2 and self._rule(offset))))
        patch_offset = 0 if rule_start else self.patch_offset + 1
        cut = (self.config.max_patch_length is not None and next_id != PAD
               and patch_offset % self.config.max_patch_length == 0)
        return offset, patch_offset, rule_start or cut

    def _rule(self, offset: int) -> bool:
        mode = self.config.mode
        if mode in ENTROPY_MODES:
            # In float32, as patch_starts compares its entropies: as doubles, a threshold within float32 rounding
            # of an entropy made a boundary the batch patcher does not.
            h2, h1 = torch.tensor(self.previous_entropies, dtype=torch.float32)
            ok = True
            if mode in ("entropy", "combined"):
                ok &= bool(h1 > self.config.threshold)
            if mode in ("monotonic", "combined"):
                ok &= bool((h1 - h2) > self.config.relative_threshold)
            return ok
        if mode == "static":
            return (offset - 1) % self.config.patch_size == 0
        if mode == "space":
            older, newer = (bool(s) for s in spacelike(torch.tensor(self.previous_ids)))
            return newer and not older
        return True  # byte

    def _entropy(self, next_id: int) -> float:
        """H at the position of `next_id`, advancing the cache; a new document starts a fresh cache."""
        model = self.patcher.model
        if self.cache is None or next_id == BOS:
            self.cache = model.new_cache(self.patcher.window)
        with torch.no_grad():
            logits = model.forward_cached(torch.tensor([[next_id]], device=model.output.weight.device), self.cache)
        return float(entropy_of(logits)[0, 0])
