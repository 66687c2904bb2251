"""What every byte LM's LightningModule shares: AdamW with warmup and cosine decay, the loss over
predicted ids (a run stops at a non-finite loss or gradient), bits-per-byte for validation and test, throughput
(bytes and patches per second; FLOPs and MFU through Lightning's ThroughputMonitor), optional
torch.compile of the transformer blocks, the TensorBoard HParams, and fine-tuning from a checkpoint's
weights (init_from)."""

import collections
import functools
import math
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import get_args

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info
from torch.utils.tensorboard.summary import hparams

from .callbacks import FlopBudget, global_batch_bytes
from .errors import BadInput, Diverged, InputError, MissingInput, weights_misfit
from .metrics import BitsPerByte, BitsPerByteByGroup
from .models.layers import FeedForwardRecompute, TransformerBlock, holds_parts, set_activation_checkpointing
from .models.lean_backward import RMSNorm
from .streams import GROUP_KINDS
from .vocab import BOS, PAD

THROUGHPUT_WINDOW = 20  # batches
NO_SCHEDULE_LENGTH = "the learning-rate schedule needs a length: set trainer.max_steps"


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup, then cosine decay to min_lr_ratio * lr at the last step."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from zero."""
    weight_decay: float = 0.1
    """Decoupled weight decay, on matrices only (not on norms)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's betas."""
    eps: float = 1e-8
    """AdamW's epsilon."""


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear from 0 to 1 over `warmup` steps, cosine down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ByteLMModule(L.LightningModule):
    """Subclasses build `self.model` and say how ids become per-target cross entropy and what a byte costs."""

    def __init__(self, optimizer: OptimizerConfig, seq_len: int, compile: bool = False,
                 flops_budget: float | None = None, init_from: str | None = None,
                 activation_checkpointing: bool | FeedForwardRecompute = False):
        super().__init__()
        if seq_len < 1:
            raise ValueError(f"seq_len (the data's, linked into the model) must be at least 1, not {seq_len}")
        self.optimizer_config, self.seq_len, self.compile_blocks = optimizer, seq_len, compile
        if activation_checkpointing not in (False, True, *get_args(FeedForwardRecompute)):
            raise ValueError("activation_checkpointing is true, false, 'byte_feed_forward' or 'feed_forward', "
                             f"not {activation_checkpointing!r}")
        self.activation_checkpointing = activation_checkpointing
        self.flops_budget = flops_budget
        self.init_from = init_from
        self.test_label = "test"  # what the printed test line calls its data (evaluate names the split it read)
        self._restored = False  # from a checkpoint of this module (loaded or resumed): init_from is not for it
        self._init_from_error = None  # why init_from did not load (setup), raised at on_train_start if not restored
        # A row of the training shape: Lightning's model summary runs it to show sizes and FLOPs per row. Not
        # with compiled blocks: it runs them under a FLOP-counting dispatch mode, where Dynamo cannot trace, and
        # Dynamo then gives up on the blocks' code for the rest of the process (they would all run eagerly).
        self.example_input_array = None if compile else torch.full((1, seq_len), BOS, dtype=torch.long)
        self.val_bpb, self.test_bpb = BitsPerByte(), BitsPerByte()
        self.test_groups = BitsPerByteByGroup()  # per source and language, when the batches say which
        self.test_report: dict = {}  # of the last test run: what `evaluate` writes
        self._recent_batches = collections.deque(maxlen=THROUGHPUT_WINDOW)  # (time, {bytes, patches}) of recent batches
        # Of the batches after the first: counts, and the times of the first batch and the last (validation left out)
        self._fit_counts, self._fit_start, self._fit_last = collections.Counter(), None, None
        self._validation_start = 0.0
        # Of the last batch, set by cross_entropy: FLOPs on this device (ThroughputMonitor reads them), those
        # of the model being trained alone (not the frozen entropy model: what a FLOP budget counts), and
        # patches (None for models without patches).
        self.flops_per_batch, self.model_flops_per_batch, self.patches_in_batch = 0.0, 0.0, None
        self.trained_flops = 0.0  # all ranks together, since the run began (resumes with it)
        self._losses_finite = None  # of the batches of the optimizer step under way (a tensor on their device)

    def cross_entropy(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unreduced cross entropy in nats, [B, L], and the target ids [B, L] it was computed for; sets
        self.flops_per_batch, model_flops_per_batch (and patches_in_batch) for the batch."""
        raise NotImplementedError

    def training_flops_per_byte(self, batches) -> tuple[float, float]:
        """FLOPs per position of a training step of the model (3x forward), patched as `batches` are, and the
        mean patch size that makes (1 for a model without patches)."""
        raise NotImplementedError

    def next_byte_cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)

    def setup(self, stage: str) -> None:
        """Fine-tuning starts from init_from's weights: loaded here, not at construction, where the model may be
        built on the meta device (config checks). A fit that resumes a checkpoint takes its weights instead, but
        Lightning restores the checkpoint only after this hook: so a failure to load init_from waits for
        on_train_start, which raises it unless a checkpoint was restored (a resumed fine-tuning run needs no
        init_from file, which may have moved since)."""
        self._init_from_error = None
        if stage == "fit" and self.init_from is not None and not self._restored:
            try:
                load_weights(self.model, self.init_from)
            except InputError as error:
                self._init_from_error = error

    def configure_model(self) -> None:
        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning's model summary would run its example row after FSDP wraps the model, outside its root
            # unit, where the weights are flat shards (Lightning issue 20255): the summary counts weights alone.
            self.example_input_array = None
        set_activation_checkpointing(self.model, self.activation_checkpointing)
        for module in self.model.modules():
            if isinstance(module, TransformerBlock) and self.compile_blocks:
                module.compile()  # block by block: the masks and patching around them stay eager

    def configure_callbacks(self):
        budget = [FlopBudget(self.flops_budget)] if self.flops_budget else []
        # FLOPs/s and, on GPUs, MFU, over the window our bytes/s use (its default, 100 batches, leaves short runs
        # without them)
        return [ThroughputMonitor(batch_size_fn=rows_in_batch, window_size=THROUGHPUT_WINDOW), *budget]

    # -- steps ----------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ce, targets = self.cross_entropy(batch)
        # Predicting BOS after EOS is bookkeeping, not language; padding is nothing.
        trained = (targets != PAD) & (targets != BOS)
        loss = (ce * trained).sum() / trained.sum().clamp(min=1)
        # Checked with the gradients, before the optimizer step: no wait for the device here.
        finite = torch.isfinite(loss.detach())
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite
        self.log("train/loss", loss, prog_bar=True, batch_size=len(targets))
        self.trained_flops += self.model_flops_per_batch * self.trainer.world_size  # ranks' batches cost about the same
        self.log("train/flops", self.trained_flops, batch_size=1)
        self._count(batch["bytes"], self.patches_in_batch)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_bpb.update(*self.cross_entropy(batch))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        cross_entropy, targets = self.cross_entropy(batch)
        self.test_bpb.update(cross_entropy, targets)
        if "group_names" in batch:
            keys = {kind: batch[kind][:, 1:] for kind in GROUP_KINDS}
            self.test_groups.update(cross_entropy, targets, keys, batch["group_names"])

    def on_test_epoch_start(self) -> None:
        self.test_groups.reset()

    def inference_cost(self) -> dict:
        """What a byte of the last test run cost to predict (FLOPs per byte; BLT: also its patches)."""
        raise NotImplementedError

    # -- optimisation ---------------------------------------------------------------------------------

    def configure_optimizers(self):
        cfg = self.optimizer_config
        # Weights of products and embeddings decay, norms' gains do not: told by module, not by shape, as under FSDP
        # the optimizer is made after wrapping, where every weight is a 1-D slice of its unit's flat shard.
        gains = {id(p) for module in self.modules() if isinstance(module, RMSNorm) for p in module.parameters()}
        matrices = [p for p in self.parameters() if p.requires_grad and id(p) not in gains]
        others = [p for p in self.parameters() if p.requires_grad and id(p) in gains]
        # One fused kernel over all weights where torch has one: on a 2-core CPU it steps the 48M BLT of
        # bench/training.py in 21 ms against 94 ms for the default loop (5% of a 4 x 1024-byte step). Not under
        # fp16's gradient scaler: a fused step unscales the gradients itself, after clipping has seen them scaled.
        fused = not self.gradients_scaled and all(p.device.type in ("cpu", "cuda") for p in matrices + others)
        optimizer = torch.optim.AdamW(
            [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": others, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None,
        )
        if self.trainer.max_steps == -1 and self.trainer.max_epochs == -1:
            raise BadInput(NO_SCHEDULE_LENGTH)
        # The schedule's length is counted once warmup is over, not here: counting an epoch's batches starts the
        # training stream, which before a checkpoint restores its position would begin again at batch 0
        # (Lightning issue 20550). Warmup, and the cosine's first step (its top), do not need it.
        @functools.cache
        def total_steps() -> int:
            total = self.trainer.estimated_stepping_batches
            if not 0 < total < math.inf:  # an endless stream, max_epochs and no max_steps
                raise BadInput(NO_SCHEDULE_LENGTH)
            return int(total)

        def multiplier(step: int) -> float:
            total = total_steps() if step > cfg.warmup_steps else cfg.warmup_steps
            return warmup_cosine(step, cfg.warmup_steps, total, cfg.min_lr_ratio)

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @property
    def gradients_scaled(self) -> bool:
        """Whether fp16's loss scaling is on: the gradients stay scaled until its GradScaler steps."""
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, also where Lightning refuses it: under FSDP by norm, which only the sharded
        model's clip_grad_norm_ computes whole over the shards, and under bf16-mixed with a fused optimizer,
        which Lightning's mixed precision refuses as it must under fp16's scaler (a fused step unscales after
        clipping), though bf16 has no scaler."""
        if not gradient_clip_val:
            return
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
        precision = self.trainer.precision_plugin
        if isinstance(self.trainer.strategy, FSDPStrategy) and algorithm == GradClipAlgorithmType.NORM:
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
        elif isinstance(precision, MixedPrecision) and not self.gradients_scaled:
            Precision.clip_gradients(precision, optimizer, gradient_clip_val, algorithm)  # 32-true's clipping
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop the run before a non-finite loss or gradient reaches the weights (gradient clipping would spread
        an inf gradient over all of them as NaN), every rank at once. The checkpoints written so far are kept.
        Under fp16's loss scaling the scaler skips such steps itself, so only the loss is checked there."""
        # Under FSDP this rank's shards: the flags below are summed over ranks.
        local = [] if self.gradients_scaled else [p.grad for group in optimizer.param_groups for p in group["params"]
                                                  if p.grad is not None]
        # A sum is not finite when a term is not: one read of each gradient, ~9x faster than isfinite().all()
        # (7 against 63 ms for bench/training.py's 48M BLT on a 2-core CPU); in float32, where half-precision
        # gradients' sums do not overflow.
        grads_finite = (torch.stack([g.sum(dtype=torch.float32) for g in local]).sum().isfinite() if local
                        else torch.tensor(True))
        losses_finite = self._losses_finite if self._losses_finite is not None else torch.tensor(True)
        self._losses_finite = None
        finite = torch.stack([losses_finite.to(self.device), grads_finite.to(self.device)]).int()
        world = self.trainer.world_size
        everyone = finite.sum() if world == 1 else self.trainer.strategy.reduce(finite.sum(), reduce_op="sum")
        loss_ok, grads_ok, count = torch.cat([finite, everyone.view(1)]).tolist()  # one wait for the device a step
        if count < 2 * world:  # every rank stops
            what = ("the training loss is" if not loss_ok else "the gradients are" if not grads_ok
                    else "another rank's training loss or gradients are")
            raise Diverged(
                f"step {self.global_step}: {what} not finite; stopping before the optimizer step. Checkpoints "
                "written so far are kept: resume from one with --ckpt_path (a lower learning rate or gradient "
                "clipping may help)."
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["trained_flops"] = self.trained_flops

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, but weights of another model shape (a --ckpt_path of another config) end the command with
        one line naming the file, not torch's line for every tensor."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as error:
            where = (self._trainer and self.trainer.ckpt_path) or "the checkpoint"
            raise BadInput(f"{where}: its weights do not fit this model's config: {weights_misfit(error)}") from None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        resuming = self._trainer is not None and self.trainer.state.fn == "fit" and "optimizer_states" in checkpoint
        if resuming and holds_parts(checkpoint["state_dict"]):
            raise ValueError(
                f"{self.trainer.ckpt_path}: written before the blocks' wq, wk, wv (and w1, w3) became one stacked "
                "weight each: its weights load (validate, test, evaluate, generate, --model.init_args.init_from), "
                "but its optimizer state, kept per weight, cannot resume this run. Start one from its weights with "
                "init_from instead.")
        self.trained_flops = checkpoint.get("trained_flops", 0.0)
        self._restored = True

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)

    # -- throughput and reports -----------------------------------------------------------------------

    def _count(self, n_bytes: int, n_patches: int | None) -> None:
        """Bytes (and patches) per second, all ranks together, over the last THROUGHPUT_WINDOW batches."""
        now, world = time.perf_counter(), self.trainer.world_size
        counts = {"bytes": n_bytes * world} | ({"patches": n_patches * world} if n_patches is not None else {})
        if self._fit_start is None:
            self._fit_start = now  # the first batch pays for warm-up: timing starts after it
        else:
            self._fit_counts.update(counts)
        self._fit_last = now
        self._recent_batches.append((now, counts))
        if len(self._recent_batches) > 1:
            (start, _), *rest = self._recent_batches
            for key in counts:
                self.log(f"train/{key}_per_sec", sum(c[key] for _, c in rest) / (now - start), batch_size=1)

    def on_validation_start(self) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self) -> None:
        """Validation, and the checkpoints its callbacks save, are no training: every time recorded so far moves on
        by their duration, so no throughput counts them (as Lightning's ThroughputMonitor does not)."""
        paused = time.perf_counter() - self._validation_start
        if self._fit_start is not None:
            self._fit_start, self._fit_last = self._fit_start + paused, self._fit_last + paused
        recent = [(at + paused, counts) for at, counts in self._recent_batches]
        self._recent_batches = collections.deque(recent, maxlen=THROUGHPUT_WINDOW)

    def on_train_end(self) -> None:
        if self._fit_start is not None and self._fit_counts["bytes"]:
            elapsed = self._fit_last - self._fit_start
            rates = ", ".join(f"{n / elapsed:,.0f} {key}/s" for key, n in self._fit_counts.items())
            # Lightning's logger, not self.print: the progress bar that self.print writes through is closed by now.
            rank_zero_info(f"trained at {rates} ({self._fit_counts['bytes']:,} bytes in {elapsed:.1f} s: the "
                           "batches after the first, validation left out)")

    # Metrics are logged here, at the epoch's end, where every rank logs them: logged in a step, they would be
    # synced at the end by the ranks that ran one, and a rank with no rows (shard URLs, fewer than the ranks) left
    # the others waiting.

    def on_validation_epoch_end(self) -> None:
        self._report("validation", self.val_bpb)
        self.log("val/bpb", self.val_bpb, prog_bar=True)

    def on_test_epoch_end(self) -> None:
        bpb, n_bytes = self._report(self.test_label, self.test_bpb)
        self.log("test/bpb", self.test_bpb)
        groups = self.test_groups.gathered(self.trainer.strategy)  # on every rank: it gathers
        self.test_report = {"bpb": bpb, "bytes": n_bytes, "byte_perplexity": 2**bpb,
                            "per_source": groups["source"], "per_lang": groups["lang"], **self.inference_cost()}

    def _report(self, split: str, metric: BitsPerByte) -> tuple[float, int]:
        bpb, n_bytes = metric.totals()  # on every rank: it gathers
        if not self.trainer.sanity_checking:
            step = f"step {self.global_step}: " if self.trainer.state.fn == "fit" else ""  # test runs start at step 0
            self.print(f"{step}{split} bpb {bpb:.4f} over {n_bytes:,} bytes")
        return bpb, n_bytes

    def on_train_start(self) -> None:
        """After any checkpoint is restored (under FSDP, after on_fit_start): only now is it known whether the run
        starts from init_from's weights."""
        if self.init_from is not None and not self._restored:
            if self._init_from_error is not None:
                raise self._init_from_error
            rank_zero_info(f"model weights from {self.init_from}")

    def on_fit_start(self) -> None:
        """The global batch, stated once; hyperparameters with val/bpb as their metric, for TensorBoard."""
        data = self.trainer.datamodule
        global_batch = None
        if data is not None and hasattr(data, "batch_size"):
            global_batch = global_batch_bytes(self.trainer, self.seq_len)
            rank_zero_info(f"global batch: {data.batch_size} rows x {self.seq_len} bytes x {self.trainer.world_size} "
                           f"ranks x {self.trainer.accumulate_grad_batches} accumulated = {global_batch:,} bytes per "
                           "optimizer step")
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger) and self.trainer.is_global_zero:
                params = flatten_hparams(dict(self.hparams)) | ({"global_batch_bytes": global_batch}
                                                               if global_batch else {})
                if self.trainer.datamodule is not None:
                    params |= flatten_hparams(dict(self.trainer.datamodule.hparams), prefix="data/")
                writer = logger.experiment._get_file_writer()  # as Lightning's own log_hyperparams does
                for summary in hparams(params, {"val/bpb": 0.0}):  # declares the metric; no value is written
                    writer.add_summary(summary)


def load_weights(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """`model`'s weights from a checkpoint of either stage (its `model.` entries, as `fit` and `import-hf` write
    them); not its optimizer state or step."""
    path = Path(checkpoint)
    if not path.is_file():
        raise MissingInput(f"{path}: init_from names no checkpoint "
                           "(train one, or write one with `blt-lightning import-hf`)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["state_dict"]
    except Exception as error:  # not a torch file, no state dict, or pickled from code that is gone
        raise BadInput(f"{path}: init_from is not a checkpoint of this project ({error})") from None
    try:
        model.load_state_dict({name.removeprefix("model."): w for name, w in state.items()
                               if name.startswith("model.")})
    except RuntimeError as error:
        raise BadInput(f"{path}: its weights do not fit this model's config: {weights_misfit(error)}") from None


def flatten_hparams(params: dict, prefix: str = "") -> dict:
    """Nested dataclasses and dicts as flat "a/b" keys with values TensorBoard accepts."""
    flat = {}
    for key, value in params.items():
        if is_dataclass(value):
            value = asdict(value)
        if isinstance(value, dict):
            flat |= flatten_hparams(value, f"{prefix}{key}/")
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def rows_in_batch(batch: dict[str, torch.Tensor]) -> int:
    return len(batch["ids"])
