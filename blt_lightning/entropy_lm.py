"""EntropyLM: stage one. Trains the entropy model with next-byte cross entropy."""

import torch

from .flops import entropy_model_flops_per_byte
from .models import EntropyModel, EntropyModelConfig
from .models.layers import FeedForwardRecompute
from .patcher import entropy_window
from .training import ByteLMModule, OptimizerConfig


class EntropyLM(ByteLMModule):
    def __init__(
        self,
        model: EntropyModelConfig = EntropyModelConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        seq_len: int = 1024,
        compile: bool = False,
        activation_checkpointing: bool | FeedForwardRecompute = False,
        flops_budget: float | None = None,
        init_from: str | None = None,
    ):
        """Stage one of BLT: the entropy model, a small byte LM.

        Args:
            model: Shape of the entropy model.
            optimizer: Optimizer and learning-rate schedule.
            seq_len: Bytes per training row (linked from the data's seq_len).
            compile: Compile each transformer block with torch.compile (for GPUs; on a CPU it needs a C++ compiler).
            activation_checkpointing: true: recompute each transformer block in backward instead of keeping its
                activations: much less memory for long rows, for about a third more compute. (Under FSDP, this
                or the strategy's activation_checkpointing_policy, not both; with that policy the options below
                only add compute.) "byte_feed_forward" or
                "feed_forward" (the same here: all its blocks run over bytes): recompute only the SwiGLU hidden
                (w1 x, w3 x) of each block, the largest thing it keeps, for one more product each.
            flops_budget: Train for this many training FLOPs of the model (all ranks together) instead of
                trainer.max_steps: the steps are derived from its FLOPs per byte (FlopBudget).
            init_from: A checkpoint (of `fit`, or written by `import-hf`) whose weights the model starts `fit`
                from: fine-tuning; not its optimizer state or step. Resuming (--ckpt_path) takes precedence.
        """
        super().__init__(optimizer, seq_len, compile, flops_budget, init_from, activation_checkpointing)
        self.save_hyperparameters(logger=False)
        self.model = EntropyModel(model)

    @property
    def flops_per_byte(self) -> float:
        """Forward FLOPs per byte over rows of the current seq_len (`evaluate --seq-len` changes it); training is 3x."""
        return entropy_model_flops_per_byte(self.model.config, self.seq_len)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)

    def cross_entropy(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, doc_ids = batch["ids"], batch["doc_ids"]
        logits = self.model(ids[:, :-1], doc_ids[:, :-1])
        targets = ids[:, 1:]
        self.flops_per_batch = self.model_flops_per_batch = (targets.numel() * self.flops_per_byte
                                                             * (3 if self.training else 1))
        return self.next_byte_cross_entropy(logits, targets), targets

    def training_flops_per_byte(self, batches) -> tuple[float, float]:
        return 3 * self.flops_per_byte, 1.0  # every byte is a position of its own

    def inference_cost(self) -> dict:
        return {"flops_per_byte": self.flops_per_byte}

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-position next-byte entropies (nats) of each row's ids."""
        window = entropy_window(self.model.config, self.seq_len)  # what the patcher sees, also without a sliding window
        return {"ids": batch["ids"], "entropies": self.model.entropies(batch["ids"], batch["doc_ids"], window)}
