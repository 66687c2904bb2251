"""FLOP-matched training (FlopBudget) and the `compare` command."""

import argparse
import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from blt_lightning import BLTLM
from blt_lightning import calibrate as calibrate_module
from blt_lightning.callbacks import FlopBudget, drawn_from_all
from blt_lightning import compare as compare_module
from blt_lightning.cli import main
from blt_lightning.compare import main as compare
from blt_lightning.compare import row_length
from blt_lightning.errors import BadInput
from blt_lightning.flops import entropy_model_flops_per_byte
from blt_lightning.models import EntropyModelConfig
from blt_lightning.patching import PatchingConfig
from blt_lightning.vocab import OFFSET, PAD, encode

from test_blt_model import TINY
from test_cli import ROOT, fit_args


def test_a_flop_budget_sets_the_steps_and_the_last_checkpoint_holds_them(corpus, tmp_path):
    config = yaml.safe_load((ROOT / "configs/entropy/tiny.yaml").read_text())["model"]["init_args"]["model"]
    per_step = 3 * entropy_model_flops_per_byte(EntropyModelConfig(**config), 32) * 4 * 32  # 4 rows of 32 bytes
    main(["fit", *fit_args(tmp_path, corpus), "--trainer.max_steps", "-1",
          "--model.init_args.flops_budget", str(5 * per_step)])
    last = torch.load(tmp_path / "entropy-tiny/version_0/checkpoints/last.ckpt", weights_only=False)
    # 5 steps, though validation (where ModelCheckpoint saves) ran at steps 2 and 4 only.
    assert last["global_step"] == 5
    assert last["trained_flops"] == pytest.approx(5 * per_step)


def test_a_flop_budget_measures_patches_on_batches_from_the_whole_validation_split():
    """Shards keep their inputs' order: the first validation batches may all be one source's. Here the first
    half's rows patch in 2 bytes (space patching of "a a a ..."), the second half's in one patch a row."""
    module = BLTLM(TINY, PatchingConfig(mode="space"), seq_len=32)

    def batches(text: bytes, count: int) -> list[dict]:
        ids = encode(text * 3)[:33].repeat(2, 1)
        return [{"ids": ids, "doc_ids": torch.zeros_like(ids), "bytes": int((ids[:, 1:] >= OFFSET).sum())}] * count

    def steps_for(val_batches: list[dict], model=module, val_dataloader=None) -> int:
        trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=1, is_global_zero=True,
                                  strategy=SimpleNamespace(broadcast=lambda x, src: x),
                                  fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(max_steps=-1)),
                                  datamodule=SimpleNamespace(batch_size=2,
                                                             val_dataloader=val_dataloader or (lambda: val_batches)))
        FlopBudget(1e12).setup(trainer, model, "fit")
        return trainer.fit_loop.epoch_loop.max_steps

    short, long = batches(b"a " * 20, 12), batches(b"a" * 40, 12)
    only_short, only_long = steps_for(short), steps_for(long)
    assert 1.1 * only_short < steps_for(short + long) < only_long / 1.1
    # A rank's share topped up with batches of padding alone: they are not drawn.
    padding = {"ids": torch.full((2, 33), PAD), "doc_ids": torch.zeros(2, 33, dtype=torch.long), "bytes": 0}
    assert steps_for(short[:1] + [padding] * 100) == only_short
    # A model whose FLOPs need no data (the entropy model's) reads none: a fit without a validation split runs.
    def no_validation():
        raise BadInput("no validation shards")

    constant = SimpleNamespace(seq_len=32, training_flops_per_byte=lambda batches: (1e6, 1.0))
    assert steps_for([], constant, no_validation) == round(1e12 / (1e6 * 2 * 32))
    with pytest.raises(BadInput, match="no validation shards"):  # rank 0's own error; the others get its message
        steps_for([], module, no_validation)
    assert list(drawn_from_all(range(1000), 8)) == sorted(drawn_from_all(range(1000), 8)), "in their order"
    assert len(set(drawn_from_all(range(1000), 8))) == 8 and list(drawn_from_all(range(5), 8)) == [0, 1, 2, 3, 4]


def test_the_entropy_threshold_is_calibrated_in_the_rows_the_experiments_train_on(tmp_path):
    quick = tmp_path / "quick.yaml"
    quick.write_text(yaml.safe_dump({"data": {"init_args": {"seq_len": 32}}}))
    entropy = ROOT / "configs/experiments/entropy.yaml"
    assert row_length([entropy]) == yaml.safe_load(entropy.read_text())["data"]["init_args"]["seq_len"]
    assert row_length([entropy, quick]) == 32
    silent = tmp_path / "silent.yaml"
    silent.write_text("trainer:\n  max_steps: 1\n")
    assert row_length([silent]) is None


def test_compare_trains_evaluates_and_tabulates(tmp_path, corpus, capsys):
    quick = tmp_path / "quick.yaml"
    quick.write_text(yaml.safe_dump({
        "trainer": {"val_check_interval": 2, "limit_val_batches": 2, "enable_progress_bar": False},
        "data": {"init_args": {"seq_len": 32, "batch_size": 4, "num_workers": 0}},
    }))
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"text": "Ein kurzer Text.", "lang": "de"}) + "\n")
    out = tmp_path / "out"
    compare(["--data", str(corpus), "--eval", str(extra), "--experiments", "byte", "static", "--budget", "3e8",
             "--output-dir", str(out), "--config", str(quick)])
    # Run again with a larger budget: what is done is not redone, and its rows are kept.
    compare(["--data", str(corpus), "--eval", str(extra), "--experiments", "static", "--budget", "3e8", "1e9",
             "--output-dir", str(out), "--config", str(quick)])
    assert len(list((out / "static-3e+08").glob("version_*"))) == 1
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["experiment"], float(r["budget_flops"])) for r in rows] == [("byte", 3e8), ("static", 3e8),
                                                                           ("static", 1e9)]
    for row in rows:
        assert 0 < float(row["bpb"]) < 9 and 0 < float(row["bpb:extra"]) < 9
        # Whole steps: at most one step's FLOPs past the budget (and at least one step).
        assert float(row["training_flops"]) > 0 and int(row["steps"]) >= 1
    static = [r for r in rows if r["experiment"] == "static"]
    assert 3.0 < float(static[0]["mean_patch_size"]) <= 4.0, "4-byte static patches, fewer at document edges"
    assert int(static[1]["steps"]) > int(static[0]["steps"]), "a larger budget buys more steps"
    assert (out / "results.md").read_text().count("\n") == 2 + len(rows)
    assert (out / "bpb_vs_flops.png").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["byte-3e+08", "evaluate", "shards",
                                                                   "static-1e+09", "static-3e+08"]
    # An experiment whose config changed is trained again and its row replaced; the others are kept.
    static = tmp_path / "static.yaml"
    static.write_text((ROOT / "configs/experiments/static.yaml").read_text().replace("patch_size: 4", "patch_size: 2"))
    compare(["--data", str(corpus), "--experiments", "byte", str(static), "--budget", "3e8",
             "--output-dir", str(out), "--config", str(quick)])
    assert "static-3e+08: its configs or entropy model changed since its row" in capsys.readouterr().out
    assert [len(list((out / run).glob("version_*"))) for run in ("byte-3e+08", "static-3e+08")] == [1, 2]
    rows = json.loads((out / "results.json").read_text())
    assert [(r["experiment"], r["budget_flops"]) for r in rows] == [("byte", 3e8), ("static", 3e8), ("static", 1e9)]
    assert float(rows[1]["mean_patch_size"]) <= 2.0
    # An --eval file added later: the runs in the table are evaluated on it, not trained again.
    more = tmp_path / "more.jsonl"
    more.write_text(json.dumps({"text": "Un texte court."}) + "\n")
    compare(["--data", str(corpus), "--eval", str(more), "--experiments", "byte", "--budget", "3e8",
             "--output-dir", str(out), "--config", str(quick)])
    assert "byte-3e+08: evaluated on" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())
    assert 0 < rows[0]["bpb:more"] < 9 and "bpb:more" not in rows[1]
    assert len(list((out / "byte-3e+08").glob("version_*"))) == 1
    # Its folder holds a comparison of this corpus: of other data, it is refused before anything runs.
    with pytest.raises(SystemExit):
        compare(["--data", str(extra), "--experiments", "byte", "--budget", "3e8", "--output-dir", str(out)])
    assert f"{out} holds a comparison of other data than --data {extra}" in capsys.readouterr().err
    assert len(list((out / "byte-3e+08").glob("version_*"))) == 1


def test_stage_one_is_reused_while_its_settings_hold_and_trained_again_when_they_change(tmp_path, monkeypatch, capsys):
    fits = []

    def fake_fit(configs, overrides, root, run_name):
        checkpoint = root / run_name / f"version_{len(fits)}" / "checkpoints" / "last.ckpt"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_text("")
        fits.append(configs)
        return checkpoint, 1.0

    monkeypatch.setattr(compare_module, "fit", fake_fit)
    monkeypatch.setattr(calibrate_module, "main", lambda argv: Path(argv[argv.index("--output") + 1]).write_text("x"))
    entropy_config = tmp_path / "entropy.yaml"
    entropy_config.write_text("trainer:\n  max_steps: 3\n")
    args = argparse.Namespace(output_dir=tmp_path, patch_size=4.5, entropy_config=entropy_config, config=[])
    manifest, data = tmp_path / "manifest.json", ["--data.init_args.manifest", "m"]
    first = compare_module.stage_one(args, manifest, data, 32)
    assert compare_module.stage_one(args, manifest, data, 32) == first
    alias = tmp_path.parent / f"{tmp_path.name}-alias"  # the same folder, named another way
    alias.symlink_to(tmp_path)
    checkpoint, patching, identity = compare_module.stage_one(argparse.Namespace(**{**vars(args), "output_dir": alias}),
                                                              manifest, data, 32)
    assert identity == first[2] and checkpoint.resolve() == first[0].resolve() and len(fits) == 1
    compare_module.stage_one(args, manifest, data, 64)  # calibrated in other rows
    entropy_config.write_text("trainer:\n  max_steps: 4\n")
    checkpoint, _, identity = compare_module.stage_one(args, manifest, data, 64)
    assert len(fits) == 3 and checkpoint.parent.parent.name == "version_2" and identity != first[2]
    assert capsys.readouterr().out.count("entropy-model: its settings changed since") == 2
    (tmp_path / "stage-one.json").unlink()  # as an earlier version left its folder
    compare_module.stage_one(args, manifest, data, 64)
    assert len(fits) == 4 and "entropy-model: it was trained by an earlier version" in capsys.readouterr().out


def test_an_unknown_experiment_is_refused_before_any_work(tmp_path, corpus, capsys):
    with pytest.raises(SystemExit):
        compare(["--data", str(corpus), "--experiments", "bytes", "--output-dir", str(tmp_path / "out")])
    assert re.search(r"no experiment config \[.*experiments/bytes\.yaml'\]", capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
    for option in ("--entropy-config", "--config"):
        with pytest.raises(SystemExit):
            compare(["--data", str(corpus), option, str(tmp_path / "none.yaml"), "--output-dir", str(tmp_path / "out")])
        assert re.search(r"no such config \[.*none\.yaml'\]", capsys.readouterr().err)
        assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="none.txt: no such file or directory"):
        compare(["--data", str(tmp_path / "none.txt"), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
