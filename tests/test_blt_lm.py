from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_blt_model import TINY

from blt_lightning import BLTLM, ByteShardDataModule
from blt_lightning.blt_lm import positions_and_patches
from blt_lightning.calibrate import main as calibrate
from blt_lightning.cli import main
from blt_lightning.flops import blt_flops_per_byte, entropy_model_flops_per_byte
from blt_lightning.models.layers import TransformerBlock
from blt_lightning.patching import PatchingConfig
from blt_lightning.prepare import MANIFEST
from blt_lightning.vocab import OFFSET, PAD, document_ids, encode

ROOT = Path(__file__).resolve().parents[1]
# Monotonic: the barely trained test entropy model gives every byte about the same entropy, so a global
# threshold would make every patch one byte, and a softmax over one key gives its query and key no gradient.
ENTROPY = PatchingConfig(mode="monotonic")


def test_a_missing_or_mismatched_entropy_checkpoint_fails_before_training(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="nope.ckpt: no entropy model checkpoint"):
        BLTLM(TINY, ENTROPY, entropy_checkpoint=str(tmp_path / "nope.ckpt"))
    with pytest.raises(ValueError, match="needs entropy_checkpoint"):
        BLTLM(TINY, ENTROPY)
    not_a_checkpoint = shards / MANIFEST
    with pytest.raises(ValueError, match="not a stage-one"):
        BLTLM(TINY, ENTROPY, entropy_checkpoint=str(not_a_checkpoint))
    stage_two = tmp_path / "stage_two.ckpt"
    torch.save({"hyper_parameters": {"model": {"dim": 8, "n_layers": 1, "n_heads": 2}, "seq_len": 16},
                "state_dict": {"model.tok_embeddings.weight": torch.zeros(3, 3)}}, stage_two)
    misfit = r"1 of another shape \(first tok_embeddings.weight: \[3, 3\] there, \[260, 8\] here\), \d+ missing"
    with pytest.raises(ValueError, match=f"do not fit its entropy model config: {misfit}") as error:
        BLTLM(TINY, ENTROPY, entropy_checkpoint=str(stage_two))
    assert "\n" not in str(error.value)
    static_blt = tmp_path / "static_blt.ckpt"  # stage two's, patched statically: it carries no entropy model
    torch.save({"hyper_parameters": {"_class_path": "blt_lightning.BLTLM", "model": asdict(TINY), "seq_len": 16},
                "state_dict": {}}, static_blt)
    with pytest.raises(ValueError, match=r"static_blt.ckpt: a stage-two \(BLTLM\) checkpoint .* carries none"):
        BLTLM(TINY, ENTROPY, entropy_checkpoint=str(static_blt))
    # From the command line: the constructor's message alone, and no data prepared.
    cli = ["fit", "--config", str(ROOT / "configs/blt/tiny.yaml"), "--model.init_args.patching.mode", "monotonic",
           "--trainer.default_root_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=r"^fit: monotonic patching needs entropy_checkpoint \(a stage-one checkpoint\)$"):
        main(cli)
    with pytest.raises(SystemExit, match="^fit: .*nope.ckpt: no entropy model checkpoint"):
        main([*cli, "--model.init_args.entropy_checkpoint", str(tmp_path / "nope.ckpt")])
    assert not (tmp_path / "run").exists()


def test_an_entropy_checkpoint_that_static_patching_does_not_use_is_a_warning(tmp_path):
    unused = r"static patching uses no entropy model: entropy_checkpoint .*nope.ckpt is not loaded"
    with pytest.warns(UserWarning, match=unused):
        BLTLM(TINY, PatchingConfig(mode="static"), entropy_checkpoint=str(tmp_path / "nope.ckpt"))


def test_the_entropy_models_flops_are_those_of_its_runs_over_this_models_rows(entropy_checkpoint):
    """On the fly the patcher runs the entropy model (trained on rows of 32) over stage two's rows, each
    position seeing at most the patcher's window: its FLOPs per byte follow this model's row length."""
    short, long = (BLTLM(TINY, ENTROPY, entropy_checkpoint=str(entropy_checkpoint), seq_len=n) for n in (16, 256))
    config, window = short.entropy_model.config, short.patcher.window
    assert window == 32  # its sliding window (256) is longer than the rows it was trained on
    assert short.entropy_flops_per_byte == entropy_model_flops_per_byte(config, 16, window=32)
    assert long.entropy_flops_per_byte == entropy_model_flops_per_byte(config, 256, window=32)
    assert short.entropy_flops_per_byte < long.entropy_flops_per_byte


def test_a_patch_budget_below_the_row_length_trains_with_lightnings_model_summary(shards):
    module = BLTLM(TINY, PatchingConfig(mode="static", patch_size=4), seq_len=32, patch_budget=12)
    data = ByteShardDataModule(manifest=str(shards / MANIFEST), seq_len=32, batch_size=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=True)
    trainer.fit(module, data)
    assert trainer.global_step == 1


def test_compiled_blocks_compile_once_for_each_kind_of_block_and_mode(shards, monkeypatch):
    """A fit with a patch_budget, validation and Lightning's model summary (the budget is the row's length, so
    the summary's row fits it): Dynamo traces each kind of block (over bytes, over patches) once for training
    and once for validation, each whole in one graph. (Dynamo gives up on code after 8 cases, and on code it
    could not trace, which then runs eagerly.)"""
    graphs = []

    def recording(graph, example_inputs):  # a backend that keeps the graph and runs it as traced
        graphs.append(graph.print_readable(print_output=False))
        return graph.forward

    monkeypatch.setattr(TransformerBlock, "compile", lambda block: torch.nn.Module.compile(block, backend=recording))
    torch._dynamo.reset()  # other tests compile blocks too, and Dynamo keeps its cases per code object
    module = BLTLM(TINY, PatchingConfig(mode="static", patch_size=4), seq_len=32, patch_budget=32, compile=True)
    data = ByteShardDataModule(manifest=str(shards / MANIFEST), seq_len=32, batch_size=4)
    trainer = L.Trainer(max_steps=4, val_check_interval=2, limit_val_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=True)
    try:
        trainer.fit(module, data)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 4
    assert all("scaled_dot_product_attention" in graph and "silu" in graph for graph in graphs)


def test_the_entropy_model_stays_frozen_while_everything_else_learns(entropy_checkpoint, shards):
    module = BLTLM(TINY, ENTROPY, entropy_checkpoint=str(entropy_checkpoint), seq_len=32)
    frozen = {k: v.clone() for k, v in module.entropy_model.state_dict().items()}
    trainable = {k: v.clone() for k, v in module.model.state_dict().items()}
    seen_grads = {}

    class Probe(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            for name, p in pl_module.named_parameters():
                seen_grads[name] = p.grad is not None and bool(p.grad.abs().sum() > 0)

    data = ByteShardDataModule(manifest=str(shards / MANIFEST), seq_len=32, batch_size=4)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, callbacks=[Probe()], enable_model_summary=False)
    trainer.fit(module, data)
    assert all(not p.requires_grad for p in module.entropy_model.parameters())
    assert not any(v for k, v in seen_grads.items() if k.startswith("entropy_model."))
    missing = [k for k, v in seen_grads.items() if k.startswith("model.") and not v]
    assert not missing, f"no gradient reached {missing}"
    assert all(torch.equal(frozen[k], v) for k, v in module.entropy_model.state_dict().items())
    assert any(not torch.equal(trainable[k], v) for k, v in module.model.state_dict().items())
    assert not module.entropy_model.training, "the entropy model must stay in inference mode"


def test_stage_two_from_the_cli_with_a_calibrated_threshold(entropy_checkpoint, shards, tmp_path, capsys, recwarn):
    snippet = tmp_path / "patching.yaml"
    calibrate(["--checkpoint", str(entropy_checkpoint), "--data", str(shards / MANIFEST), "--target", "2.5",
               "--output", str(snippet)])
    main(["fit", "--config", str(ROOT / "configs/blt/tiny.yaml"), "--config", str(snippet),
          "--model.init_args.entropy_checkpoint", str(entropy_checkpoint),
          "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
          "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
          "--trainer.limit_val_batches", "2",
          "--data.sources", "null", "--data.manifest", str(shards / MANIFEST), "--data.seq_len", "32",
          "--data.batch_size", "4", "--data.num_workers", "0"])
    run = tmp_path / "blt-tiny" / "version_0"
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    assert {"val/bpb", "train/loss", "train/mean_patch_size", "train/patches_per_row",
            "val/mean_patch_size"} <= set(events.Tags()["scalars"])
    assert len(events.Images("patches")) == 1, "drawn once: the frozen entropy model patches the same at every step"
    assert 1.5 < events.Scalars("val/mean_patch_size")[-1].value < 4
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "validation bpb" in capsys.readouterr().out
    # the frozen entropy model is in eval mode by design: Lightning's warning of that is not shown
    assert not [w for w in recwarn if "in eval mode at the start of training" in str(w.message)]

    # test and predict over the same (test) split: the bits predict gives per byte add up to test's bpb, and
    # test's mean patch size is its bytes over its patches.
    for subcommand in ("test", "predict"):  # runs version_1 and version_2
        main([subcommand, "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    events = EventAccumulator(str(run.parent / "version_1"))
    events.Reload()
    predicted = [torch.load(f) for f in sorted((run.parent / "version_2" / "predictions").glob("*.pt"))]
    assert predicted, "predict wrote nothing"
    targets = torch.cat([p["ids"][:, 1:] for p in predicted])
    is_byte = targets >= OFFSET
    bits = torch.cat([p["bits"] for p in predicted])
    assert events.Scalars("test/bpb")[-1].value == pytest.approx(float(bits[is_byte].sum() / is_byte.sum()), rel=1e-5)
    patch_bytes, patches = 0, 0
    for p in predicted:
        patch_ids = p["patch_starts"].cumsum(1) - 1
        byte_positions = p["ids"][:, :-1] >= OFFSET
        patch_bytes += int(byte_positions.sum())
        patches += sum(len(row[held].unique()) for row, held in zip(patch_ids, byte_positions))
    assert events.Scalars("test/mean_patch_size")[-1].value == pytest.approx(patch_bytes / patches, rel=1e-5)
    # patches per row of data: the all-padding rows that fill the last batch are not rows of the split
    rows = [(row_starts.sum(), row_ids) for p in predicted for row_starts, row_ids in zip(p["patch_starts"], p["ids"])]
    assert any((row_ids == PAD).all() for _, row_ids in rows), "no batch was filled: the test tests nothing"
    per_row = [float(n) for n, row_ids in rows if (row_ids[:-1] != PAD).any()]
    assert events.Scalars("test/patches_per_row")[-1].value == pytest.approx(sum(per_row) / len(per_row), rel=1e-5)


def test_the_flops_of_a_training_step_are_measured_on_patches_of_bytes_not_of_padding():
    """FlopBudget measures the mean patch size on validation batches, whose last rows end in padding; training rows,
    packed, have none. A padded batch measures what its rows' bytes alone do."""
    module = BLTLM(TINY, PatchingConfig(mode="static", patch_size=4), seq_len=32)

    def measure(ids: torch.Tensor) -> tuple[float, float]:
        return module.training_flops_per_byte([{"ids": ids, "doc_ids": torch.zeros_like(ids)}])

    text = torch.randint(OFFSET, OFFSET + 256, (2, 33))
    patches = 32 / measure(text[:1])[1] + 9 / measure(text[1:, :10])[1]  # rows of 32 and 9 positions
    padded = text.clone()
    padded[1, 9:] = PAD  # the row of 9, then a run of 23 padding positions (one patch, were it counted)
    per_byte, patch_size = measure(padded)
    assert patch_size == pytest.approx(41 / patches)
    assert per_byte == pytest.approx(3 * blt_flops_per_byte(module.model.config, 32, 41 / patches))


def test_inference_flops_are_counted_at_the_positions_per_patch_the_model_runs():
    """BOS and EOS are positions, here patches of their own, which the global transformer runs over too: the test
    run's FLOPs per byte count them, while its mean patch size is the paper's (bytes over patches holding bytes)."""
    module = BLTLM(TINY, PatchingConfig(mode="space"), seq_len=32)
    documents = [encode(text) for text in (b"a b c d", b"lorem ipsum dolor", b"x", b"sit amet")]
    ids = torch.cat(documents + [torch.full((66,), PAD)])[:66].view(2, 33)
    batch = {"ids": ids, "doc_ids": document_ids(ids)}
    found = module.patch_batch(batch)
    positions, patches = positions_and_patches(ids[:, :-1], found)
    assert positions / patches != pytest.approx(found.mean_size), "the two counts must differ for this test to tell"
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        module, dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    cost = module.inference_cost()
    assert cost["mean_patch_size"] == pytest.approx(found.mean_size)
    assert cost["flops_per_byte"] == pytest.approx(blt_flops_per_byte(module.model.config, 32, positions / patches))
