"""`evaluate`: bpb over a whole set, per source and per language, of checkpoints of both stages."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blt_lightning.evaluate import evaluate
from blt_lightning.flops import blt_flops_per_byte, entropy_model_flops_per_byte
from blt_lightning.loading import load_lm
from blt_lightning.prepare import MANIFEST
from blt_lightning.vocab import encode, is_byte

from conftest import make_documents, write_jsonl

CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


def test_bpb_is_the_sum_over_documents_and_splits_by_source_and_language(entropy_checkpoint, tmp_path):
    docs = make_documents(30, seed=1)
    for doc in docs[::4]:
        del doc["lang"]  # counted under "unknown"
    corpus = write_jsonl(tmp_path / "eval.jsonl", docs)
    # Rows longer than the whole set: every document is read with all of its context, so the bpb must be
    # that of each document scored on its own, summed in nats and bytes.
    report = evaluate(str(entropy_checkpoint), [str(corpus)], tmp_path / "out", seq_len=8192, batch_size=2, **CPU)

    model = load_lm(entropy_checkpoint).model
    nats, by_source, by_lang = 0.0, {}, {}
    for doc in docs:
        ids = encode(doc["text"].encode())
        with torch.no_grad():
            logits = model(ids[None, :-1])[0]
        counted = is_byte(ids[1:])
        doc_nats = float(F.cross_entropy(logits.double(), ids[1:], reduction="none")[counted].sum())
        nats += doc_nats
        for groups, name in ((by_source, doc["source"]), (by_lang, doc.get("lang", "unknown"))):
            total = groups.setdefault(name, [0.0, 0])
            total[0] += doc_nats
            total[1] += int(counted.sum())
    n_bytes = sum(len(doc["text"].encode()) for doc in docs)
    assert report["bytes"] == n_bytes
    assert report["bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
    assert report["byte_perplexity"] == pytest.approx(2 ** report["bpb"])
    for kind, expected in (("per_source", by_source), ("per_lang", by_lang)):
        assert set(report[kind]) == set(expected)
        for name, (group_nats, group_bytes) in expected.items():
            assert report[kind][name]["bytes"] == group_bytes
            assert report[kind][name]["bpb"] == pytest.approx(group_nats / (math.log(2) * group_bytes), rel=1e-5)
    assert "unknown" in report["per_lang"]
    trained = load_lm(entropy_checkpoint)  # on rows of 32: the rows evaluated here see more keys a byte
    assert report["flops_per_byte"] == entropy_model_flops_per_byte(trained.model.config, 8192) > trained.flops_per_byte


def test_blt_report_on_a_manifest_split_with_patches_and_flops(blt_checkpoint, shards, tmp_path, capsys):
    report = evaluate(str(blt_checkpoint), [str(shards / MANIFEST)], tmp_path, split="validation", **CPU)
    assert f"validation bpb {report['bpb']:.4f} over {report['bytes']:,} bytes" in capsys.readouterr().out
    manifest = json.loads((shards / MANIFEST).read_text())["splits"]["validation"]
    assert report["bytes"] == manifest["bytes"] and report["model"] == "BLTLM"
    assert sum(g["bytes"] for g in report["per_source"].values()) == manifest["bytes"]
    assert sum(g["bpb"] * g["bytes"] for g in report["per_lang"].values()) == pytest.approx(
        report["bpb"] * report["bytes"])
    module = load_lm(blt_checkpoint)
    assert 1.0 < report["mean_patch_size"] < 32
    # counted at the positions per patch the model runs, whose BOS and EOS make patches shorter than the bytes' own
    # (test_blt_lm has the exact count)
    blt_flops = report["flops_per_byte"] - module.entropy_flops_per_byte
    assert module.entropy_flops_per_byte > 0
    assert (blt_flops_per_byte(module.model.config, module.seq_len, report["mean_patch_size"]) < blt_flops
            < blt_flops_per_byte(module.model.config, module.seq_len, 1.0))


def test_the_entropy_models_flops_are_counted_over_the_rows_evaluated(blt_checkpoint, shards, tmp_path):
    module = load_lm(blt_checkpoint)
    rows = module.seq_len // 2
    report = evaluate(str(blt_checkpoint), [str(shards / MANIFEST)], tmp_path, split="validation", seq_len=rows, **CPU)
    counted = entropy_model_flops_per_byte(module.entropy_model.config, rows, window=module.patcher.window)
    assert report["entropy_model_flops_per_byte"] == counted != module.entropy_flops_per_byte


def test_a_stage_two_checkpoint_carries_its_entropy_model(blt_checkpoint, tmp_path, recwarn):
    """Evaluating, sampling or fine-tuning a stage-two checkpoint needs nothing else: not the stage-one file."""
    ckpt = torch.load(blt_checkpoint, weights_only=False)
    ckpt["hyper_parameters"]["entropy_checkpoint"] = str(tmp_path / "gone.ckpt")
    moved = tmp_path / "moved.ckpt"
    torch.save(ckpt, moved)
    module = load_lm(moved)
    original = load_lm(blt_checkpoint)
    for (name, a), (_, b) in zip(module.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name
    assert module.patcher.window == original.patcher.window
    # and so do Lightning's test, validate and predict (which restore the saved path, now of nothing)
    from blt_lightning.cli import main

    main(["test", "--config", str(blt_checkpoint.parents[1] / "config.yaml"), "--ckpt_path", str(moved),
          "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.limit_test_batches", "1"])
    # the path it restored is of nothing, and not what patches: no warning names it
    assert not [w for w in recwarn if "entropy_checkpoint" in str(w.message)]


def test_a_stage_two_run_resumes_with_the_entropy_model_it_carries(blt_checkpoint, tmp_path):
    """`fit --ckpt_path last` builds the model before it resumes: from the run's last.ckpt's entropy model, not from
    the stage-one file the config names (here gone)."""
    import shutil

    from blt_lightning.cli import main

    run = blt_checkpoint.parents[2]  # blt-tiny, with version_0 in it
    shutil.copytree(run, tmp_path / run.name)
    main(["fit", "--config", str(tmp_path / run.name / "version_0" / "config.yaml"),
          "--trainer.default_root_dir", str(tmp_path),
          "--model.init_args.entropy_checkpoint", str(tmp_path / "gone.ckpt"),
          "--ckpt_path", "last", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"])
    last = tmp_path / run.name / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3


def test_bad_checkpoints_and_data_are_named(entropy_checkpoint, tmp_path):
    from blt_lightning.cli import main

    not_a_checkpoint = write_jsonl(tmp_path / "x.jsonl", [{"text": "hi"}])
    with pytest.raises(SystemExit, match="x.jsonl: not a checkpoint"):
        main(["evaluate", "--checkpoint", str(not_a_checkpoint), "--data", str(not_a_checkpoint)])
    with pytest.raises(SystemExit, match="missing.json: no manifest"):
        main(["evaluate", "--checkpoint", str(entropy_checkpoint), "--data", str(tmp_path / "missing.json")])


def test_json_lines_of_another_field_with_a_malformed_line(entropy_checkpoint, tmp_path):
    from blt_lightning.cli import main

    data = tmp_path / "other.jsonl"
    data.write_text('{"body": "the first document"}\n{"body": \n{"body": "and a second, longer one"}\n')
    args = ["evaluate", "--checkpoint", str(entropy_checkpoint), "--data", str(data), "--text-field", "body",
            "--accelerator", "cpu", "--output-dir"]
    with pytest.raises(SystemExit, match="other.jsonl:2: .*pass --skip_malformed"):
        main([*args, str(tmp_path / "strict")])
    main([*args, str(tmp_path / "lenient"), "--skip_malformed", "--json", str(tmp_path / "report.json")])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["bytes"] == len("the first document") + len("and a second, longer one")


def evaluate_on_two_ranks(checkpoint: Path, data: str, tmp_path: Path, *options: str) -> dict:
    """`evaluate` under DDP on two CPU ranks through the command line: its JSON report. Ranks that hang fail the
    test (both are killed: the second is the first's child)."""
    out = tmp_path / "two.json"
    process = subprocess.Popen([sys.executable, "-m", "blt_lightning", "evaluate", "--checkpoint", str(checkpoint),
                                "--data", data, "--json", str(out), "--output-dir", str(tmp_path),
                                "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", *options],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError("the ranks hung") from None
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(out.read_text())


def test_two_ranks_report_what_one_does(blt_checkpoint, shards, tmp_path):
    """DDP on CPU through the command line: the groups each rank saw are merged, nothing counted twice."""
    one = evaluate(str(blt_checkpoint), [str(shards / MANIFEST)], tmp_path, **CPU)
    two = evaluate_on_two_ranks(blt_checkpoint, str(shards / MANIFEST), tmp_path, "--num-workers", "1")
    assert two["bytes"] == one["bytes"] and two["patches"] == one["patches"]
    assert two["bpb"] == pytest.approx(one["bpb"], rel=1e-6)
    for kind in ("per_source", "per_lang"):
        assert {k: g["bytes"] for k, g in two[kind].items()} == {k: g["bytes"] for k, g in one[kind].items()}


def test_two_ranks_of_which_one_gets_no_rows_report_what_one_does(blt_checkpoint, shards, tmp_path):
    """A shard given as a URL (no manifest to even out the ranks' batches) on two ranks: one reads it, the other
    no row at all, and still takes part in every sync of the metrics (it used to leave the other waiting)."""
    shard = str(sorted(shards.glob("test-*.tar"))[0])
    one = evaluate(str(blt_checkpoint), [shard], tmp_path, **CPU)
    two = evaluate_on_two_ranks(blt_checkpoint, shard, tmp_path, "--num-workers", "0")
    assert two["bytes"] == one["bytes"] > 0 and two["bpb"] == pytest.approx(one["bpb"], rel=1e-6)
    assert two["mean_patch_size"] == pytest.approx(one["mean_patch_size"], rel=1e-6)
