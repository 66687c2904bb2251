import logging
import re
import shutil
import warnings
from pathlib import Path

import jsonargparse
import pytest
import torch
import yaml
from lightning.pytorch.strategies import Strategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from blt_lightning.cli import BLTLightningCLI, check_stage, main
from conftest import SLURM_ONE_TASK
from blt_lightning.loading import load_lm
from blt_lightning.models.layers import TransformerBlock, stacked_as_parts
from blt_lightning.tool_parser import ToolParser

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(set((ROOT / "configs").rglob("*.yaml")) - set((ROOT / "configs/trainer").glob("*.yaml")))
TRAINER_CONFIGS = sorted((ROOT / "configs/trainer").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_parses_and_builds(config, tmp_path, monkeypatch, entropy_checkpoint):
    """Every YAML parses against the code and builds its model (on the meta device: shapes, no memory)."""
    monkeypatch.chdir(ROOT)
    args = ["--config", str(config), "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu",
            "--trainer.precision", "32-true", "--trainer.devices", "1", "--trainer.strategy", "auto"]
    if "blt_lightning.BLTLM" in config.read_text():
        args += ["--model.init_args.entropy_checkpoint", str(entropy_checkpoint)]
    with torch.device("meta"):
        cli = BLTLightningCLI(args=args, run=False, subclass_mode_model=True, subclass_mode_data=True)
    assert cli.model.seq_len == cli.datamodule.seq_len, "seq_len must be linked from the data"
    kinds = [type(c).__name__ for c in cli.trainer.callbacks]
    for kind in ("ModelCheckpoint", "LastCheckpoint", "CheckpointOnTerminate", "PredictionWriter"):
        assert kind in kinds, f"{kind} is missing: every config resumes, saves on SIGTERM and writes predictions"


def test_activation_checkpointing_feed_forward_reaches_every_block_from_the_command_line(tmp_path, monkeypatch):
    """The option's Literal type parses through jsonargparse; for the entropy model every block is over bytes."""
    from blt_lightning.models.layers import TransformerBlock

    monkeypatch.chdir(ROOT)
    args = ["--config", str(ROOT / "configs/entropy/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
            "--model.init_args.activation_checkpointing", "feed_forward"]
    cli = BLTLightningCLI(args=args, run=False, subclass_mode_model=True, subclass_mode_data=True)
    cli.model.configure_model()
    blocks = [m for m in cli.model.modules() if isinstance(m, TransformerBlock)]
    assert blocks and all(b.feed_forward.recompute_hidden and not b.recompute_in_backward for b in blocks)


def test_a_model_seq_len_other_than_the_datas_is_an_error_not_overwritten_by_the_link(tmp_path, monkeypatch, capsys):
    """jsonargparse puts data.seq_len over the model's without a word. A run's saved config.yaml holds both (the
    same): with another --data.seq_len it still parses, and the model takes the new length."""
    monkeypatch.chdir(ROOT)

    def cli(*args):
        base = ["--config", str(ROOT / "configs/entropy/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path)]
        return BLTLightningCLI(args=[*base, *args], run=False, subclass_mode_model=True, subclass_mode_data=True)

    with pytest.raises(SystemExit):
        cli("--model.init_args.seq_len", "64")
    assert ("model seq_len 64 (on the command line) is linked from the data's seq_len, 256: set that instead"
            in capsys.readouterr().err)
    model_only = tmp_path / "model.yaml"
    model_only.write_text("model:\n  init_args:\n    seq_len: 128\n")
    with pytest.raises(SystemExit):
        cli("--config", str(model_only))
    assert f"model seq_len 128 (in {model_only}) is linked from the data's seq_len, 256" in capsys.readouterr().err
    assert cli("--model.init_args.seq_len=256").model.seq_len == 256
    saved = tmp_path / "saved.yaml"
    saved.write_text("data:\n  init_args:\n    seq_len: 128\nmodel:\n  init_args:\n    seq_len: 128\n")
    assert cli("--config", str(saved), "--data.seq_len", "64").model.seq_len == 64
    short = tmp_path / "short.yaml"  # the data's seq_len not under init_args, as a hand-written file may put it
    short.write_text("data:\n  seq_len: 128\nmodel:\n  init_args:\n    seq_len: 128\n")
    assert cli("--config", str(short), "--data.seq_len", "64").model.seq_len == 64
    assert cli("--config", "{run_name: " + "x" * 300 + "}").model.seq_len == 256  # YAML text, too long a file name


def fit_args(root, corpus):
    return [
        "--config", str(ROOT / "configs/entropy/tiny.yaml"),
        "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "3",
        "--data.sources", f"[{corpus}]", "--data.prepare.shard_bytes", "2000",
        "--data.seq_len", "32", "--data.batch_size", "4", "--data.num_workers", "0",
    ]


def test_fit_writes_checkpoint_config_and_tensorboard_bpb(corpus, tmp_path, capfd, caplog):
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    main(["fit", *fit_args(tmp_path, corpus)])
    assert re.search(r"step 4: validation bpb \d\.\d{4} over [\d,]+ bytes", capfd.readouterr().out)
    assert re.search(r"trained at [\d,]+ bytes/s \([\d,]+ bytes in [\d.]+ s: the batches after the first, "
                     "validation left out", caplog.text)
    assert "`weights_only` was not set" not in caplog.text  # last.ckpt is saved whole, by intent
    run = tmp_path / "entropy-tiny" / "version_0"
    checkpoints = sorted((run / "checkpoints").glob("*.ckpt"))
    assert [c.name for c in checkpoints][-1] == "last.ckpt" and (run / "config.yaml").is_file()
    assert (tmp_path / "shards" / "manifest.json").is_file(), "sources are prepared under default_root_dir"
    events = EventAccumulator(str(run))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"val/bpb", "train/loss", "train/lr", "train/bytes_per_sec"} <= set(scalars)
    assert [e.step for e in events.Scalars("val/bpb")] == [1, 3]
    assert 0 < events.Scalars("val/bpb")[-1].value < 9
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        events.SummaryMetadata("_hparams_/experiment").plugin_data.content)
    assert [m.name.tag for m in experiment.experiment.metric_infos] == ["val/bpb"]
    assert "model/dim" in {h.name for h in experiment.experiment.hparam_infos}

    ckpt = torch.load(checkpoints[0], weights_only=False)
    assert ckpt["hyper_parameters"]["seq_len"] == 32
    # last.ckpt records the best checkpoint the ModelCheckpoint kept at the same validation (a resumed run
    # goes on tracking it), not the one it had before.
    (best,) = [state["best_model_path"] for name, state in torch.load(checkpoints[-1], weights_only=False)
               ["callbacks"].items() if name.startswith("ModelCheckpoint")]
    assert best == str(checkpoints[0]) and len(checkpoints) == 2

    # The other subcommands run from the same config and checkpoint.
    for subcommand in ("validate", "test", "predict"):
        main([subcommand, *fit_args(tmp_path, corpus), "--ckpt_path", str(checkpoints[-1])])
    assert (tmp_path / "entropy-tiny" / "version_3" / "config.yaml").is_file()
    predictions = sorted((tmp_path / "entropy-tiny" / "version_3" / "predictions").glob("*.pt"))
    assert predictions, "predict wrote nothing"
    first = torch.load(predictions[0])
    assert first["entropies"].shape == first["ids"].shape and (first["entropies"] >= 0).all()
    # `--ckpt_path last` evaluates the run's last.ckpt, as its path does (not the model untrained)
    capfd.readouterr()
    scores = []
    for ckpt_path in (str(checkpoints[-1]), "last"):
        main(["validate", *fit_args(tmp_path, corpus), "--ckpt_path", ckpt_path])
        scores += re.findall(r"validation bpb (\d\.\d{4})", capfd.readouterr().out)
    assert len(scores) == 2 and scores[0] == scores[1]


def test_a_checkpoint_files_model_options_replace_the_given_ones_with_a_warning(corpus, tmp_path, entropy_checkpoint):
    validate = ["validate", *fit_args(tmp_path, corpus), "--ckpt_path", str(entropy_checkpoint)]
    with pytest.warns(UserWarning, match=r"restores the model options it was saved with, in place of the config's: "
                                         r"model\.init_args\.optimizer\.lr: 0\.5 -> 0\.003$"):
        main([*validate, "--model.init_args.optimizer.lr", "0.5"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(validate)  # the options it was trained with: nothing to say
    assert not [w for w in caught if "restores the model options" in str(w.message)]


def test_a_ckpt_path_of_the_other_stage_or_no_checkpoint_or_a_cut_last_one_is_a_message(tmp_path, entropy_checkpoint, capsys):
    blt = ["--config", str(ROOT / "configs/blt/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=rf"^validate: {entropy_checkpoint}: its model is EntropyLM and the "
                                         r"config's is BLTLM: give the config of the checkpoint's stage$"):
        main(["validate", *blt, "--ckpt_path", str(entropy_checkpoint)])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(SystemExit, match=rf"^test: {garbage}: not a checkpoint of `blt-lightning fit`: it does not "
                                         r"load \(not a zip archive"):
        main(["test", *blt, "--ckpt_path", str(garbage)])
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(SystemExit, match=rf"^fit: --ckpt_path {re.escape(str(missing))}: no such file$"):
        main(["fit", *blt, "--ckpt_path", str(missing)])
    with pytest.raises(SystemExit, match=rf"^validate: --ckpt_path {re.escape(str(tmp_path))}: a folder; give the "
                                         "checkpoint file in it$"):
        main(["validate", *blt, "--ckpt_path", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^predict: --ckpt_path last: no version of the run .*blt-tiny holds "
                                         r"checkpoints/last\.ckpt"):
        main(["predict", *blt, "--ckpt_path", "last"])
    assert "Parsing of ckpt_path" not in capsys.readouterr().err and not (tmp_path / "run").exists()
    # The last.ckpt that `--ckpt_path last` resumes from is checked too (a disk that failed: saves are atomic).
    last = tmp_path / "resumed" / "entropy-tiny" / "version_0" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(entropy_checkpoint.read_bytes()[:5000])
    with pytest.raises(SystemExit, match=rf"^fit: {last}: not a checkpoint of `blt-lightning fit`: it does not load"):
        main(["fit", "--config", str(ROOT / "configs/entropy/tiny.yaml"), "--ckpt_path", "last",
              "--trainer.default_root_dir", str(tmp_path / "resumed")])

def test_configs_compose_and_print(corpus, tmp_path, capsys):
    override = tmp_path / "override.yaml"
    override.write_text("data:\n  init_args:\n    seq_len: 48\nmodel:\n  init_args:\n    model:\n      n_layers: 1\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs/entropy/tiny.yaml"), "--config", str(override), "--print_config"])
    printed = capsys.readouterr().out
    assert "seq_len: 48" in printed and "n_layers: 1" in printed
    # A misspelled option is refused, not taken for the one it begins
    for subcommand, option, refused in [
        ("fit", "--trainer.max_step", "--trainer.max_step 3"),
        ("validate", "--trainer.max_step", "--trainer.max_step 3"),
        ("fit", "--model.init_args.optimizer.warmup_step", "--optimizer.warmup_step=3"),  # the model's own parser's
        ("fit", "--model.model.n_layer", "--model.n_layer=3"),
        ("fit", "--optimizer", "--optimizer 3"),  # LightningCLI's, which would replace the model's optimizer and schedule
    ]:
        with pytest.raises(SystemExit):
            main([subcommand, "--config", str(ROOT / "configs/entropy/tiny.yaml"), option, "3", "--print_config"])
        assert f"unrecognized arguments: {refused}" in capsys.readouterr().err


def test_an_option_misspelled_in_a_config_file_names_the_file(tmp_path, capsys):
    top, nested = tmp_path / "top.yaml", tmp_path / "nested.yaml"
    top.write_text("trainer:\n  max_step: 3\n")
    nested.write_text("model:\n  init_args:\n    optimizer:\n      learning_rate: 0.1\n")
    tiny = str(ROOT / "configs/entropy/tiny.yaml")
    for config, option in [(["-c", str(top)], r"(trainer\.)?max_step"), ([f"--config={nested}"], "learning_rate")]:
        with pytest.raises(SystemExit):
            main(["fit", "--config", tiny, *config, "--print_config"])
        assert re.search(rf"^'{option}' is set in {config[-1].split('=')[-1]}$", capsys.readouterr().err, re.M)
    with pytest.raises(SystemExit):  # on the command line, where the user sees it
        main(["fit", "--config", tiny, "--trainer.max_step", "3", "--print_config"])
    assert "is set in" not in capsys.readouterr().err


def test_a_config_file_that_is_not_yaml_is_named_with_where_it_breaks(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n\tmax_steps: 3\n")  # a tab indents
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs/entropy/tiny.yaml"), "--config", str(broken), "--print_config"])
    assert f"{broken} is not valid YAML: line 2, column 1: found character '\\t'" in capsys.readouterr().err


@pytest.mark.parametrize("config", TRAINER_CONFIGS, ids=lambda p: p.stem)
def test_every_trainer_config_composes_with_a_model_config(config, capsys):
    """A trainer config is a second --config on any model config; its strategy builds (FSDP: each
    transformer block wrapped), though GPU ones cannot run here."""
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs/blt/tiny.yaml"), "--config", str(config), "--print_config"])
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["precision"] == yaml.safe_load(config.read_text())["trainer"]["precision"]
    assert trainer["callbacks"], "a trainer config must not drop the model config's callbacks"
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--strategy", type=Strategy | str)
    strategy = parser.instantiate(parser.parse_object({"strategy": trainer["strategy"]})).strategy
    if config.stem == "fsdp":
        assert strategy.kwargs["auto_wrap_policy"]._module_classes == {TransformerBlock}


def test_last_checkpoint_holds_the_last_step_though_validation_stopped_improving(corpus, tmp_path):
    """At a learning rate of 0 no validation improves on the first: last.ckpt still follows the run, to the
    step after the last validation, and the best checkpoint stays at the first."""
    main(["fit", *fit_args(tmp_path, corpus), "--trainer.max_steps", "5", "--model.init_args.optimizer.lr", "0"])
    checkpoints = tmp_path / "entropy-tiny/version_0/checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 5
    assert [c.name for c in checkpoints.glob("*.ckpt") if c.name != "last.ckpt"] == ["epoch=0-step=2.ckpt"]
    # fast_dev_run saves no checkpoint (Lightning's own callbacks do not either)
    main(["fit", *fit_args(tmp_path / "dev", corpus), "--trainer.fast_dev_run", "true"])
    assert not list((tmp_path / "dev").rglob("*.ckpt"))


def test_flops_per_second_reach_tensorboard_within_a_short_run(corpus, tmp_path):
    main(["fit", *fit_args(tmp_path, corpus), "--trainer.max_steps", "22", "--trainer.val_check_interval", "11"])
    events = EventAccumulator(str(tmp_path / "entropy-tiny" / "version_0"))
    events.Reload()
    assert {"train/device/flops_per_sec", "train/bytes_per_sec"} <= set(events.Tags()["scalars"])


def test_gradient_accumulation_the_global_batch_in_bytes_and_fused_adamw(corpus, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    main(["fit", *fit_args(tmp_path, corpus), "--trainer.max_steps", "2", "--trainer.accumulate_grad_batches", "3"])
    assert "global batch: 4 rows x 32 bytes x 1 ranks x 3 accumulated = 384 bytes per optimizer step" in caplog.text
    ckpt = torch.load(tmp_path / "entropy-tiny/version_0/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == 6
    assert all(group["fused"] for group in ckpt["optimizer_states"][0]["param_groups"])


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_blocks_compute_what_eager_ones_do():
    """Forward and backward (the blocks' norms and SwiGLU are autograd functions of their own)."""
    from blt_lightning import EntropyLM
    from blt_lightning.models import EntropyModelConfig

    torch.manual_seed(0)
    eager = EntropyLM(EntropyModelConfig(dim=32, n_layers=2, n_heads=2), seq_len=16)
    compiled = EntropyLM(EntropyModelConfig(dim=32, n_layers=2, n_heads=2), seq_len=16, compile=True)
    compiled.load_state_dict(eager.state_dict())
    compiled.configure_model()
    assert all(block._compiled_call_impl is not None for block in compiled.model.layers)
    ids = torch.randint(4, 260, (2, 16))
    outputs = [module(ids) for module in (compiled, eager)]
    torch.testing.assert_close(*outputs, atol=1e-5, rtol=1e-5)
    for output in outputs:
        output.square().mean().backward()
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_requeued_slurm_job_resumes_its_own_run_and_a_new_job_starts_afresh(corpus, tmp_path, monkeypatch, caplog):
    """Under SLURM a fit's folder is named by its job id and is its default_root_dir, where Lightning looks for hpc
    checkpoints (any SLURM job resumes from one there): a requeued job resumes from the newest checkpoint of its
    own run, last.ckpt or hpc, and never from another run's."""
    for name, value in SLURM_ONE_TASK.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    args = [*fit_args(tmp_path, corpus), "--trainer.val_check_interval", "2"]
    run = tmp_path / "entropy-tiny/slurm-4242"

    def fit(job: str, steps: int, resumed_from: Path | None) -> None:
        monkeypatch.setenv("SLURM_JOB_ID", job)
        caplog.clear()
        main(["fit", *args, "--trainer.max_steps", str(steps)])
        restored = re.findall(r"Restored all states from the checkpoint at (\S+)", caplog.text)
        assert restored == ([str(resumed_from)] if resumed_from else [])
        assert torch.load(tmp_path / f"entropy-tiny/slurm-{job}/checkpoints/last.ckpt",
                          weights_only=False)["global_step"] == steps

    (tmp_path / "hpc_ckpt_7.ckpt").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "hpc_ckpt_7.ckpt").write_bytes(b"another run's, in the shared root")
    fit("4242", 2, None)
    assert (tmp_path / "shards/manifest.json").exists(), "shards stay under default_root_dir"
    fit("4242", 4, run / "checkpoints/last.ckpt")  # requeued after SIGTERM, which saved last.ckpt only
    shutil.copy(run / "checkpoints/last.ckpt", run / "hpc_ckpt_1.ckpt")  # as Lightning's own SIGUSR1 handler saves
    fit("4242", 6, run / "hpc_ckpt_1.ckpt")  # requeued: the hpc checkpoint is the newest
    fit("4242", 8, run / "checkpoints/last.ckpt")  # requeued again: last.ckpt (step 6) is newer than the hpc one
    assert sorted(p.name for p in (tmp_path / "entropy-tiny").iterdir()) == ["slurm-4242"]
    fit("4343", 2, None)  # a new job of the same run name starts from step 0


def test_a_run_of_an_earlier_version_with_its_weights_unstacked_does_not_resume(corpus, tmp_path):
    one_step = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
    main(["fit", *fit_args(tmp_path / "run", corpus), *one_step])
    checkpoint = torch.load(tmp_path / "run/entropy-tiny/version_0/checkpoints/last.ckpt", weights_only=False)
    checkpoint["state_dict"] = stacked_as_parts(checkpoint["state_dict"])  # as earlier versions wrote them
    earlier = tmp_path / "earlier.ckpt"
    torch.save(checkpoint, earlier)
    with pytest.raises(ValueError, match="earlier.ckpt: written before the blocks' wq, wk, wv"):
        main(["fit", *fit_args(tmp_path / "resumed", corpus), "--ckpt_path", str(earlier)])
    weights = load_lm(earlier).model.state_dict()  # its weights still load
    assert all(torch.equal(w, checkpoint["state_dict"][f"model.{n}"]) for n, w in stacked_as_parts(weights).items())


def test_ckpt_path_last_evaluates_a_checkpoint_callbacks_own_folder(corpus, tmp_path, capfd):
    """Where a config puts checkpoints in a dirpath of its own, `last` is the last.ckpt there, as Lightning finds it."""
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(tmp_path / "kept"), "save_last": True}}]}}))
    main(["fit", *fit_args(tmp_path / "runs", corpus), "--config", str(callbacks), "--trainer.max_steps", "2"])
    capfd.readouterr()
    scores = []
    for ckpt_path in (str(tmp_path / "kept" / "last.ckpt"), "last"):
        main(["validate", *fit_args(tmp_path / "runs", corpus), "--config", str(callbacks), "--ckpt_path", ckpt_path])
        scores += re.findall(r"validation bpb (\d\.\d{4})", capfd.readouterr().out)
    assert len(scores) == 2 and scores[0] == scores[1]
    check_stage("validate", "Registry:a-model", None)  # Lightning's model registry, any case: not a file to check


def test_missing_data_or_weights_found_once_a_fit_runs_are_a_message(corpus, tmp_path, capsys):
    """Inputs read only when the trainer runs (sources, a manifest, init_from's weights) end the command with the
    message that names them, not under Lightning's frames."""
    fit = ["fit", *fit_args(tmp_path, corpus), "--trainer.max_steps", "1"]
    nothing, other = tmp_path / "nothing", tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.other": torch.zeros(1)}}, other)  # its error message runs over lines
    for extra, message in [
        (["--data.sources", f"[{nothing}]"], f"{nothing}: no such file or directory"),
        (["--data.sources", "null", "--data.manifest", str(nothing / "manifest.json")], "no manifest here"),
        (["--data.sources", f"[{tmp_path}]"], "shards: inside the input directory"),  # where shards would go
        (["--model.init_args.init_from", str(nothing / "weights.ckpt")], "weights.ckpt: init_from names no checkpoint"),
        (["--model.init_args.init_from", str(other)], f"{other}: its weights do not fit this model's config"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main([*fit, *extra])
        assert str(exited.value.code).startswith("blt-lightning: ") and message in str(exited.value.code)
        assert "\n" not in str(exited.value.code) and "Traceback" not in capsys.readouterr().err
    # not torch's line for each weight
    assert "missing (first tok_embeddings.weight), 1 unexpected (first other)" in str(exited.value.code)

    # resuming a run with a model of another shape (`last`, whose saved options Lightning does not read): one line
    # naming the checkpoint, with what differs
    main(fit)
    with pytest.raises(SystemExit) as exited:
        main([*fit, "--model.init_args.model.dim", "48", "--ckpt_path", "last"])
    trained = next(tmp_path.rglob("last.ckpt"))
    assert str(exited.value.code).startswith(f"blt-lightning: {trained}: its weights do not fit this model's config: ")
    assert "of another shape (first " in str(exited.value.code)
    assert "\n" not in str(exited.value.code) and "Traceback" not in capsys.readouterr().err
    blt = [arg.replace("configs/entropy/tiny.yaml", "configs/blt/tiny.yaml") for arg in fit]
    with pytest.raises(SystemExit, match="^blt-lightning: model.attention flex trains on GPUs only"):
        main([*blt, "--model.init_args.model.attention", "flex"])


def test_ckpt_path_last_starts_a_fine_tuning_run_then_resumes_it_without_its_init_from_file(corpus, tmp_path, caplog,
                                                                                           recwarn):
    """The same command starts a run and resumes it (torchrun --max-restarts, SLURM); resuming takes the
    checkpoint's weights, so the init_from file the run started from may be gone by then."""
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    main(["fit", *fit_args(tmp_path / "base", corpus), "--trainer.max_steps", "2"])
    base = tmp_path / "base.ckpt"
    next((tmp_path / "base").rglob("last.ckpt")).rename(base)
    fine_tune = ["fit", *fit_args(tmp_path / "tuned", corpus), "--model.init_args.init_from", str(base),
                 "--ckpt_path", "last"]
    main([*fine_tune, "--trainer.max_steps", "2"])
    assert "--ckpt_path last: the run has no last.ckpt yet, so it starts afresh" in caplog.text
    assert not [w for w in recwarn if "save_last" in str(w.message)]  # Lightning's advice: LastCheckpoint replaces it
    base.unlink()
    main(fine_tune)
    last = torch.load(next((tmp_path / "tuned").rglob("last.ckpt")), weights_only=False)
    assert last["global_step"] == 4


def test_numbers_out_of_range_and_empty_input_are_messages_before_any_work(tmp_path, entropy_checkpoint, capsys):
    fit = ["fit", "--config", str(ROOT / "configs/entropy/tiny.yaml"), "--trainer.default_root_dir",
           str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=r"^fit: data\.batch_size must be at least 1, not 0$"):
        main([*fit, "--data.batch_size", "0"])
    with pytest.raises(SystemExit, match=r"^fit: seq_len \(the data's, linked into the model\) must be at least 1"):
        main([*fit, "--data.seq_len", "0"])
    assert not (tmp_path / "run").exists()

    checkpoint, manifest = str(entropy_checkpoint), str(tmp_path / "unread.json")
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("model: [unclosed")
    listed_yaml, misspelled_yaml = tmp_path / "listed.yaml", tmp_path / "misspelled.yaml"
    listed_yaml.write_text("- model\n")
    (tmp_path / "listed.json").write_text("{}")
    misspelled_yaml.write_text("model:\n  init_args:\n    patching:\n      mode: entropy\n      thresh: 2\n")
    for tool, message in [
        (["generate", "--checkpoint", checkpoint, "--temperature", "nan"], "--temperature nan: a finite 0 or more"),
        (["calibrate", "--checkpoint", checkpoint, "--data", manifest, "--target", "3", "--seq_len", "0"],
         "--sample_bytes and --seq_len must be at least 1"),
        # options spelled out, with underscores or hyphens alike; an abbreviation is not taken
        (["calibrate", "--checkpoint", checkpoint, "--data", manifest, "--target", "3", "--seq-len=0"],
         "--sample_bytes and --seq_len must be at least 1"),
        (["import-hf", "--model", checkpoint, "--output", str(tmp_path / "i"), "--seq_len", "0"],
         "--seq-len must be at least 1"),
        (["generate", "--checkpoint", checkpoint, "--max-b", "5"], "unrecognized arguments: --max-b"),
        # named as what it is, not as the required option it was meant to be going missing
        (["calibrate", "--checkpoint", checkpoint, "--data", manifest, "--targ", "3"], "unrecognized arguments: --targ"),
        (["calibrate", "--checkpoint", checkpoint, "--data", manifest, "--target", "3", "--output", str(tmp_path)],
         "is a directory: name the file to write"),
        (["evaluate", "--checkpoint", checkpoint, "--data", manifest, "--batch-size", "0"],
         "--batch-size and --seq-len must be at least 1"),
        (["evaluate", "--checkpoint", checkpoint, "--data", manifest, "--json", str(tmp_path)],
         "is a directory: name the file to write"),
        (["patch", "--checkpoint", checkpoint, "--mode", "entropy", "--threshold", "1", "--text", ""],
         "the text is empty: no bytes to patch"),
        (["patch", "--patching", str(broken_yaml), "--text", "x"], "broken.yaml: not YAML"),
        (["patch", "--patching", str(listed_yaml), "--text", "x"], "no model.init_args.patching section"),
        (["patch", "--patching", str(misspelled_yaml), "--text", "x"], "model.init_args.patching has no option thresh"),
        (["patch", "--checkpoint", checkpoint, "--text", "x", "--plot", str(tmp_path)], "is a directory: name the file"),
        (["patch", "--checkpoint", checkpoint, "--text", "x", "--plot", "f.png", "--plot_bytes", "0"],
         "--plot_bytes must be at least 1"),
        (["generate", "--checkpoint", checkpoint, "--top-k", "300"], "--top-k 300: from 1 to 260"),
        # a device torch does not know, or does not have here: named as such, not as a checkpoint that does not load
        (["generate", "--checkpoint", checkpoint, "--device", "bogus"], "--device: bogus: not a torch device"),
        (["calibrate", "--checkpoint", checkpoint, "--data", manifest, "--target", "3", "--device", "cuda:9"],
         f"--device: cuda:9: torch sees {torch.cuda.device_count()} CUDA devices here"),
        (["entropies", "--checkpoint", checkpoint, "--manifest", manifest, "--output", str(tmp_path / "c"), "--device",
          "bogus"], "--device: bogus: not a torch device"),
        (["patch", "--checkpoint", checkpoint, "--text", "x", "--device", "bogus"], "--device: bogus: not a torch"),
        (["evaluate", "--checkpoint", checkpoint, "--data", manifest, "--devices", "0"], "--devices must be at least 1"),
        # Where a file stands in for a folder of the output's path: found now, not after the work.
        (["evaluate", "--checkpoint", checkpoint, "--data", manifest, "--json", f"{checkpoint}/report.json"],
         f"{checkpoint} is a file, not a folder"),
        (["calibrate", "--checkpoint", checkpoint, "--data", manifest, "--target", "3", "--output",
          f"{checkpoint}/p.yaml"], f"{checkpoint} is a file, not a folder"),
        (["export-hf", "--checkpoint", checkpoint, "--output", f"{checkpoint}/hf"], f"{checkpoint} is a file, not a"),
        (["import-hf", "--model", str(tmp_path), "--output", str(tmp_path / "i"), "--seq-len", "-4"],
         "--seq-len must be at least 1"),
        (["compare", "--budget", "0", "--output-dir", str(tmp_path / "c")], "each --budget must be a positive number"),
        (["compare", "--eval", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "c")], "no --eval file"),
        (["compare", "--eval", str(listed_yaml), str(tmp_path / "listed.json"), "--output-dir", str(tmp_path / "c")],
         "--eval files whose names share a column of the table"),
        (["compare", "--output-dir", f"{checkpoint}/c"], f"{checkpoint} is a file, not a folder"),
    ]:
        with pytest.raises(SystemExit) as exited:  # argparse prints its message; sys.exit carries it
            main(tool)
        assert message in f"{exited.value.code} {capsys.readouterr().err}", tool
    assert not (tmp_path / "c").exists()


def test_tool_options_take_either_spelling_and_values_stay_as_given():
    parser = ToolParser(prog="tool")
    parser.add_argument("--patch_size", type=int)
    parser.add_argument("--text")
    parser.add_argument("files", nargs="*")
    assert vars(parser.parse_args(["--patch-size=3", "--text", "--patch-size=4 is a value", "--", "--patch-size"])) \
        == {"patch_size": 3, "text": "--patch-size=4 is a value", "files": ["--patch-size"]}
    with pytest.raises(SystemExit):
        parser.parse_args(["--patch", "3"])  # an abbreviation is not taken


@pytest.mark.parametrize("args, said", [(["calibrat", "--target", "4"], "no command 'calibrat' (did you mean "
                                                                         "calibrate?)"), ([], "give a command")])
def test_a_missing_or_mistyped_command_lists_every_command(args, said):
    """LightningCLI's own message lists its subcommands only: the tools would seem not to exist."""
    with pytest.raises(SystemExit, match=re.escape(f"blt-lightning: {said}; the commands are fit, validate, test, "
                                                   "predict, prepare, entropies, calibrate, patch, evaluate")):
        main(args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_a_gpu_trainer_config_on_a_machine_without_one_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit, match=r"^blt-lightning: Lightning: No supported gpu backend found! \(this machine "
                                         r"has no GPU: --trainer.accelerator cpu\)$"):
        main(["fit", "--config", "configs/entropy/tiny.yaml", "--config", "configs/trainer/gpu.yaml",
              "--trainer.default_root_dir", str(tmp_path)])


def test_tool_help_gives_each_options_default_once():
    parser = ToolParser(prog="tool")
    parser.add_argument("--budget", type=float, nargs="+", default=[1e13], help="FLOPs")
    parser.add_argument("--workers", type=int, default=0, help="workers")
    parser.add_argument("--split", default="test", help="a split (default: test)")
    parser.add_argument("--json", help="a report")
    parser.add_argument("--eval", nargs="*", default=[], help="files")
    parser.add_argument("--rate", default="5%", help="a share")
    shown = " ".join(parser.format_help().split())
    assert "FLOPs (default: 1e+13)" in shown and "workers (default: 0)" in shown and "a share (default: 5%)" in shown
    assert "a split (default: test) --json" in shown and "a report --eval" in shown and "files --rate" in shown
