"""Gradient clipping under the trainer configs' precisions and strategies. Lightning refuses two pairs that our
configs make: bf16-mixed with the fused AdamW, and FSDP with clipping by norm."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy
from test_cli import ROOT, fit_args
from test_resume import tiny_fit

from blt_lightning import EntropyLM
from blt_lightning.cli import main
from blt_lightning.models import EntropyModelConfig

CLIP = 1e-3  # far below the gradients' norm at the start


class GradientSizes(L.Callback):
    """The total norm and largest magnitude of the gradients each optimizer step took (clipped, and unscaled).
    Lightning runs the forward and backward inside optimizer.step: they are read after it."""

    def __init__(self):
        self.norms, self.largest = [], []

    def on_train_start(self, trainer, pl_module):
        def record(optimizer, args, kwargs):
            grads = [p.grad.float() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            self.largest.append(max(float(g.abs().max()) for g in grads))

        trainer.optimizers[0].register_step_post_hook(record)


@pytest.mark.parametrize("scaled, algorithm", [(False, "norm"), (False, "value"), (True, "norm")],
                         ids=["bf16-mixed", "bf16-mixed-by-value", "fp16-scaled"])
def test_mixed_precision_clips_the_gradients_the_optimizer_steps_with(shards, scaled, algorithm):
    """bf16 has no gradient scaler: the fused AdamW steps with the gradients as clipped. Under fp16's scaler a
    fused step would unscale after clipping, so AdamW is not fused there and Lightning unscales first."""
    sizes = GradientSizes()
    precision = ({"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]} if scaled
                 else {"precision": "bf16-mixed"})
    module, data, trainer = tiny_fit(shards, [sizes], gradient_clip_val=CLIP, gradient_clip_algorithm=algorithm,
                                     **precision)
    trainer.fit(module, data)
    assert trainer.global_step == 4
    assert all(group["fused"] is not scaled for group in trainer.optimizers[0].param_groups)
    assert len(sizes.norms) >= 3  # the scaler may skip a first step
    clipped = sizes.norms if algorithm == "norm" else sizes.largest
    assert max(clipped) <= CLIP * 1.001
    assert algorithm == "norm" or max(sizes.norms) > CLIP * 1.001, "by value, not by norm"


def test_the_gpu_config_trains_on_a_cpu(corpus, tmp_path):
    """configs/trainer/gpu.yaml (bf16-mixed) under a model config (gradient clipping, fused AdamW), run on a CPU."""
    main(["fit", *fit_args(tmp_path, corpus), "--config", str(ROOT / "configs/trainer/gpu.yaml"),
          "--trainer.accelerator", "cpu", "--trainer.max_steps", "2"])
    last = torch.load(tmp_path / "entropy-tiny/version_0/checkpoints/last.ckpt", weights_only=False)
    assert last["global_step"] == 2


def test_under_fsdp_clipping_by_norm_is_the_sharded_models():
    """FSDP's gradients are shards: only the sharded root module's clip_grad_norm_ sees their norm whole
    (Lightning's FSDP precision refuses clipping by norm). FSDP needs a GPU, so the trainer is a stand-in."""
    module = EntropyLM(EntropyModelConfig(dim=32, n_layers=1, n_heads=2), seq_len=16)
    clipped = []
    sharded_root = SimpleNamespace(clip_grad_norm_=clipped.append)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), model=sharded_root, precision_plugin=Precision())
    module.configure_gradient_clipping(torch.optim.AdamW(module.parameters()), 0.5, "norm")
    assert clipped == [0.5]
