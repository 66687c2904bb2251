"""BLTLM: stage two. Trains the Byte Latent Transformer, with the frozen stage-one entropy model patching."""

import math
import warnings

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from .errors import BadInput
from .flops import blt_flops_per_byte, entropy_model_flops_per_byte
from .models.blt import BLTConfig, ByteLatentTransformer
from .models.layers import FeedForwardRecompute
from .patcher import CARRIED_ENTROPY_MODEL, Patcher, carried_entropy_model, load_entropy_model, weights_sha256
from .patching import Patches, PatchingConfig
from .training import ByteLMModule, OptimizerConfig
from .visualize import patch_figure
from .vocab import PAD, encode

FIGURE_TEXT = "The Byte Latent Transformer, by George R.R. Martin: 字节, байты, בייטים."


def positions_and_patches(ids: torch.Tensor, patches: Patches) -> tuple[int, int]:
    """Positions of a batch's rows the model reads, PAD left out, and their patches (a run of padding is none):
    the patch size its FLOPs per byte are counted at."""
    return int((ids != PAD).sum()), int((patches.mask & ~patches.padding).sum())


class BLTLM(ByteLMModule):
    def __init__(
        self,
        model: BLTConfig = BLTConfig(),
        patching: PatchingConfig = PatchingConfig(mode="static"),
        entropy_checkpoint: str | None = None,
        patch_budget: int | None = None,
        figure_text: str = FIGURE_TEXT,
        optimizer: OptimizerConfig = OptimizerConfig(),
        seq_len: int = 1024,
        compile: bool = False,
        activation_checkpointing: bool | FeedForwardRecompute = False,
        flops_budget: float | None = None,
        init_from: str | None = None,
    ):
        """Stage two of BLT: local encoder, global latent transformer and local decoder over patches.

        Args:
            model: Shape of the Byte Latent Transformer.
            patching: How bytes become patches: entropy, monotonic and combined modes use the entropy
                model (with a threshold from `blt-lightning calibrate`); static, space and byte do not.
            entropy_checkpoint: Stage-one checkpoint whose frozen entropy model patches (entropy modes), or a
                stage-two checkpoint (which carries its entropy model). Batches that carry stored entropies
                (`blt-lightning entropies`) are patched from those.
            patch_budget: Pad every row to this many patches, so shapes stay fixed (torch.compile).
            figure_text: Text whose entropies and patches are drawn to TensorBoard at the first validation of
                each fit or validate (a resumed fit draws it again): the entropy model is frozen and the
                threshold fixed, so they do not change while BLT trains.
            optimizer: Optimizer and learning-rate schedule.
            seq_len: Bytes per training row (linked from the data's seq_len).
            compile: Compile each transformer block with torch.compile (for GPUs; on a CPU it needs a C++
                compiler). Patch counts vary per batch: a patch_budget keeps the global model's shapes fixed.
            activation_checkpointing: true: recompute each transformer block in backward instead of keeping its
                activations: much less memory for long rows, for about a third more compute. (Under FSDP, this
                or the strategy's activation_checkpointing_policy, not both; with that policy the options below
                only add compute.) "byte_feed_forward": recompute only the SwiGLU hidden (w1 x, w3 x) of the
                blocks that run over bytes (the local encoder's and decoder's), the largest thing they keep, for
                one more product each. "feed_forward": that of the global transformer's blocks too, the largest
                thing they keep.
            flops_budget: Train for this many training FLOPs of the model (all ranks together) instead of
                trainer.max_steps: the steps are derived from its FLOPs per byte at the mean patch size
                of validation batches drawn from the whole split (FlopBudget).
            init_from: A stage-two checkpoint (of `fit`, or written by `import-hf`) whose weights the model starts
                `fit` from: fine-tuning; not its optimizer state or step, nor its entropy model (entropy_checkpoint's).
                Resuming (--ckpt_path) takes precedence.
        """
        super().__init__(optimizer, seq_len, compile, flops_budget, init_from, activation_checkpointing)
        self.save_hyperparameters(logger=False)
        entropy_model, context = None, None
        if patching.needs_entropies:
            if entropy_checkpoint is None:
                raise ValueError(f"{patching.mode} patching needs entropy_checkpoint (a stage-one checkpoint)")
            entropy_model, context = load_entropy_model(entropy_checkpoint)
        elif entropy_checkpoint is not None:  # not loaded, so not checked: the user may expect it to patch
            rank_zero_warn(f"{patching.mode} patching uses no entropy model: entropy_checkpoint {entropy_checkpoint} "
                           "is not loaded")
        # frozen: no gradients, never in the optimizer
        self.entropy_model, self.entropy_context = entropy_model, context
        self.patcher = Patcher(patching, entropy_model, context)
        self.model = ByteLatentTransformer(model)
        self.patch_budget, self.figure_text = patch_budget, figure_text
        self._figure_drawn = False
        if patch_budget is not None and patch_budget < seq_len:
            # The example row Lightning's model summary runs is all BOS, each its own patch: past the budget.
            self.example_input_array = None
        # of this test run: bytes, patches holding bytes, positions (not PAD), patches over them, entropy-model runs
        self._tested = torch.zeros(5, dtype=torch.float64)
        # Bytes over patches of a whole validation or test run (per-batch sizes weighted by their patches),
        # not a mean of batches' sizes, which a batch of a few long patches would sway.
        self.val_patch_size, self.test_patch_size = MeanMetric(), MeanMetric()
        self.val_patches_per_row, self.test_patches_per_row = MeanMetric(), MeanMetric()

    @property
    def entropy_flops_per_byte(self) -> float:
        """The entropy model's forward FLOPs per byte: the patcher runs it over this model's rows (seq_len, which
        evaluate may change), each position seeing the patcher's window."""
        if self.entropy_model is None:
            return 0.0
        return entropy_model_flops_per_byte(self.entropy_model.config, self.seq_len, window=self.patcher.window)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, self.patch(ids, None, None))

    def patch(self, ids: torch.Tensor, doc_ids: torch.Tensor | None, entropies: torch.Tensor | None) -> Patches:
        with torch.no_grad():
            return self.patcher(ids, doc_ids, entropies, self.patch_budget)

    def patch_batch(self, batch: dict[str, torch.Tensor]) -> Patches:
        """Patches of a batch's inputs: from its stored entropies if it has them, else as the patcher decides."""
        stored = batch.get("entropies")
        return self.patch(batch["ids"][:, :-1], batch["doc_ids"][:, :-1],
                          stored[:, :-1] if stored is not None else None)

    def cross_entropy(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, doc_ids = batch["ids"][:, :-1], batch["doc_ids"][:, :-1]
        patches = self.patch_batch(batch)
        patches_per_row = patches.mask.sum(-1)
        if self._trainer is not None:
            split = "train" if self.training else "test" if self.trainer.testing else "val"
            # Rows of data only: not the all-padding rows that fill a last batch or even out ranks' batches.
            patches_of_data_rows = patches_per_row[(ids != PAD).any(-1)].float()
            if split == "train":
                self.log("train/mean_patch_size", patches.mean_size, batch_size=len(ids))
                if len(patches_of_data_rows):
                    self.log("train/patches_per_row", patches_of_data_rows.mean(), batch_size=len(ids))
            else:  # over all ranks' rows of the whole run, not a mean of batches' means: logged at the epoch's end
                size, per_row = ((self.test_patch_size, self.test_patches_per_row) if split == "test"
                                 else (self.val_patch_size, self.val_patches_per_row))
                size.update(patches.mean_size, patches.byte_patches)
                per_row.update(patches_of_data_rows)
        logits = self.model(ids, patches, doc_ids)
        targets = batch["ids"][:, 1:]
        entropy_model_ran = self.entropy_model is not None and "entropies" not in batch
        self._count_cost(patches, int(patches_per_row.sum()), entropy_model_ran)
        if self._trainer is not None and self.trainer.testing:
            self._tested += torch.tensor([patches.patched_bytes, patches.byte_patches,
                                          *positions_and_patches(ids, patches), entropy_model_ran])
        return self.next_byte_cross_entropy(logits, targets), targets

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Each row's ids [B, L + 1], where its patches start [B, L], and the bits each next id cost [B, L]
        (position t: -log2 p(ids[t + 1])); their sum over byte targets, over the bytes, is the bpb."""
        patches = self.patch_batch(batch)
        logits = self.model(batch["ids"][:, :-1], patches, batch["doc_ids"][:, :-1])
        bits = self.next_byte_cross_entropy(logits, batch["ids"][:, 1:]) / math.log(2)
        return {"ids": batch["ids"], "patch_starts": patches.starts, "bits": bits}

    def _count_cost(self, patches: Patches, n_patches: int, entropy_model_ran: bool) -> None:
        """FLOPs of this batch on this device, from its positions per (real) patch; its patches."""
        self.patches_in_batch = n_patches
        positions = patches.patch_ids.numel()
        per_byte = blt_flops_per_byte(self.model.config, self.seq_len, positions / max(1, self.patches_in_batch))
        if self.training:
            per_byte *= 3  # backward: twice the forward
        self.model_flops_per_batch = positions * per_byte
        self.flops_per_batch = self.model_flops_per_batch + positions * self.entropy_flops_per_byte * entropy_model_ran

    def training_flops_per_byte(self, batches) -> tuple[float, float]:
        """Trained FLOPs per position (3x forward) at the mean patch size of `batches` (positions per patch).
        Padding (ending a split's last rows) and its patches are left out: training rows, packed, have none, and
        counted, a run of padding as one long patch made their patches look longer, and a FlopBudget's steps
        too many."""
        positions, patches = 0, 0
        for batch in batches:
            batch_positions, batch_patches = positions_and_patches(batch["ids"][:, :-1], self.patch_batch(batch))
            positions, patches = positions + batch_positions, patches + batch_patches
        if not patches:
            raise ValueError("no batch to measure the mean patch size on")
        return 3 * blt_flops_per_byte(self.model.config, self.seq_len, positions / patches), positions / patches

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._tested.zero_()

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self.log("test/mean_patch_size", self.test_patch_size)
        self.log("test/patches_per_row", self.test_patches_per_row)

    def inference_cost(self) -> dict:
        """The test run's mean patch size (bytes per patch that holds bytes, as the paper counts) and its forward
        FLOPs per byte (per position, as in training), with the entropy model's when it patched on the fly.
        The FLOPs are counted at the positions per patch the model ran: BOS and EOS are positions, often patches
        of their own, and the global transformer runs over those patches too."""
        tested = self.trainer.strategy.reduce(self._tested.to(self.device), reduce_op="sum")
        n_bytes, n_patches, positions, position_patches, entropy_runs = tested.tolist()
        mean_patch_size = n_bytes / max(1.0, n_patches)
        flops = blt_flops_per_byte(self.model.config, self.seq_len, positions / max(1.0, position_patches))
        entropy_flops = self.entropy_flops_per_byte if entropy_runs else 0.0
        return {"mean_patch_size": mean_patch_size, "patches": int(n_patches), "flops_per_byte": flops + entropy_flops,
                "entropy_model_flops_per_byte": entropy_flops}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The entropy model's weights are in the state dict; its shape goes beside them, so that the
        checkpoint alone can be evaluated, sampled from or fine-tuned (it loads as its own entropy_checkpoint)."""
        super().on_save_checkpoint(checkpoint)
        if self.entropy_model is not None:
            checkpoint[CARRIED_ENTROPY_MODEL] = carried_entropy_model(self.entropy_model.config, self.entropy_context)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._check_stored_entropies()
        device = self.trainer.strategy.root_device.type if self._trainer is not None else None
        if stage == "fit" and self.model.config.attention == "flex" and device not in (None, "cuda"):
            raise BadInput("model.attention flex trains on GPUs only (FlexAttention has no backward off them): "
                           "set --model.init_args.model.attention sdpa")

    def _check_stored_entropies(self) -> None:
        """Entropies stored with the data (`blt-lightning entropies`) patch instead of this run's entropy model, which
        patches in generation and is saved with the checkpoints: they must be that model's. (Manifests written before
        the weights' fingerprint was recorded are not checked.)"""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        stored = getattr(datamodule, "stored_entropies", None) or {}
        recorded = stored.get("weights_sha256")
        if self.entropy_model is None or recorded is None or recorded == weights_sha256(self.entropy_model):
            return
        raise BadInput(f"{datamodule.manifest_read}: its stored entropies were computed by the entropy model of "
                       f"{stored.get('checkpoint')}, whose weights are not those of entropy_checkpoint "
                       f"{self.hparams.entropy_checkpoint}: store them with that model (`blt-lightning entropies "
                       "--checkpoint`), or give that model's checkpoint")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.entropy_model is not None:
            # Lightning warns of the modules in eval mode as training starts: the frozen entropy model's are meant to
            # be. Only their exact count is silenced; any other module in eval mode changes it.
            frozen = sum(1 for _ in self.entropy_model.modules())
            warnings.filterwarnings("ignore", message=rf"Found {frozen} module\(s\) in eval mode at the start of train")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.entropy_model is not None:
            self.entropy_model.eval()  # frozen, always in inference mode
        return self

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log("val/mean_patch_size", self.val_patch_size)
        self.log("val/patches_per_row", self.val_patches_per_row)
        if (self.entropy_model is None or self._figure_drawn or self.trainer.sanity_checking
                or not self.trainer.is_global_zero):
            return
        self._figure_drawn = True
        ids = encode(self.figure_text.encode()).to(self.device)
        entropies = self.entropy_model.document_entropies(ids, self.patcher.window)
        starts = self.patcher(ids[None], entropies=entropies[None]).starts[0]
        figure = patch_figure(ids, entropies, starts, self.patcher.config.threshold,
                              f"step {self.global_step}: {self.patcher.config.mode} patching")
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("patches", figure, self.global_step)
