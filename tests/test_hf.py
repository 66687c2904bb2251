"""import-hf and export-hf against transformers' BltForCausalLM: tiny random models, float32 on the CPU."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_documents, write_jsonl

transformers = pytest.importorskip("transformers", minversion="5.23",
                                   reason="the hf extra (transformers>=5.23) is not installed")
from safetensors.torch import load_file, save_file  # noqa: E402  (after the skip: safetensors comes with transformers)

from blt_lightning.blt_lm import BLTLM  # noqa: E402
from blt_lightning.cli import main  # noqa: E402
from blt_lightning.evaluate import evaluate  # noqa: E402
from blt_lightning.generate import main as generate  # noqa: E402
from blt_lightning.hf import entropy_names, hf_config_kwargs  # noqa: E402
from blt_lightning.hf_export import export_hf  # noqa: E402
from blt_lightning.hf_import import import_hf  # noqa: E402
from blt_lightning.loading import load_lm  # noqa: E402
from blt_lightning.models.blt import BLTConfig  # noqa: E402
from blt_lightning.patcher import CARRIED_ENTROPY_MODEL  # noqa: E402
from blt_lightning.patching import PatchingConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS, LENGTH = 4, 40  # longer than the local window (16) and the patcher's (8)
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


def tiny_hf_config(**overrides):
    """A tiny BltConfig: k * encoder width (64) != global width (48), so the global input projection exists; two
    hash functions; cross-attention in every decoder layer; windows shorter than the rows."""
    rope = {"rope_type": "default", "rope_theta": 500000.0}

    def local(layers: int, all_layers: bool) -> dict:
        return {"hidden_size": 32, "num_hidden_layers": layers, "num_attention_heads": 2, "intermediate_size": 64,
                "hidden_size_global": 48, "cross_attn_k": 2, "cross_attn_all_layers": all_layers,
                "rope_parameters": rope}

    patcher = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 96,
               "sliding_window": 8, "max_position_embeddings": 64,
               "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    return transformers.BltConfig(**{
        "max_position_embeddings": 64, "patch_in_forward": True, "patching_mode": "entropy", "patch_size": 4,
        "patching_threshold": 5.0, "max_patch_length": 6, "local_attention_window_len": 16, "cross_attn_k": 2,
        "encoder_hash_byte_group_size": [3, 4, 5], "encoder_hash_byte_group_vocab": 101,
        "encoder_hash_byte_group_nb_functions": 2, "patcher_config": patcher, "encoder_config": local(1, False),
        "decoder_config": local(2, True), "rope_parameters": rope, "use_cache": False,
        "global_config": {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96,
                          "rope_parameters": rope}} | overrides)


def random_blt(config):
    """A BltForCausalLM with random weights, norm gains included (ones would hide swapped norms)."""
    model = transformers.BltForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def fit_one_step(root: Path, corpus: Path, *overrides: str) -> Path:
    """`fit` of configs/blt/tiny.yaml (then `overrides`) for one step on `corpus`; its last checkpoint."""
    main(["fit", "--config", str(ROOT / "configs/blt/tiny.yaml"), *overrides, "--trainer.default_root_dir", str(root),
          "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
          "--data.sources", f"[{corpus}]", "--data.prepare.shard_bytes", "2000", "--data.seq_len", "32",
          "--data.batch_size", "2", "--data.num_workers", "0"])
    return root / "blt-tiny" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture
def small_corpus(tmp_path) -> Path:
    """A few documents: enough for a training step or an evaluation, quickly."""
    return write_jsonl(tmp_path / "small.jsonl", make_documents(8))


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    """One document a row, as BltForCausalLM knows rows: BOS, then bytes."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 260, (ROWS, LENGTH), generator=generator)
    ids[:, 0] = 1
    return ids


@pytest.fixture(scope="module")
def hf_blt(ids, tmp_path_factory):
    """(folder, model): a tiny BltForCausalLM that patches itself, saved by save_pretrained; its threshold lies
    between two of its patcher's entropies on `ids` (none within rounding of it), so that patches vary."""
    torch.manual_seed(0)
    model = random_blt(tiny_hf_config())
    entropies = model.model.patcher(ids)[0][:, 1:].flatten().sort().values
    middle = len(entropies) // 2
    assert entropies[middle + 1] - entropies[middle] > 1e-4, "the threshold would sit within rounding of an entropy"
    model.config.patching_threshold = float(entropies[middle] + entropies[middle + 1]) / 2
    folder = tmp_path_factory.mktemp("hf") / "blt"
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def imported(hf_blt, tmp_path_factory) -> dict[str, Path]:
    return import_hf(hf_blt[0], tmp_path_factory.mktemp("imported"))


def test_imported_blt_computes_bltforcausallm_logits_with_its_patcher(hf_blt, imported, ids):
    _, hf = hf_blt
    lm = load_lm(imported["blt"])
    assert lm.patcher.config == PatchingConfig("entropy", threshold=hf.config.patching_threshold, max_patch_length=6)
    with torch.no_grad():
        ours, theirs = lm(ids), hf(ids).logits
    # Not a row's last position, which BltForCausalLM decides from how the batch's patch lengths are padded (hf.py).
    torch.testing.assert_close(ours[:, :-1], theirs[:, :-1], **TOLERANCE)


def test_imported_entropy_model_computes_the_patchers_entropies(hf_blt, imported, ids):
    _, hf = hf_blt
    with torch.no_grad():
        theirs = hf.model.patcher(ids)[0]
    torch.testing.assert_close(load_lm(imported["blt"]).patcher.entropies(ids), theirs, **TOLERANCE)
    stage_one = load_lm(imported["entropy"])
    torch.testing.assert_close(stage_one.model.entropies(ids, window=8), theirs, **TOLERANCE)


def test_imported_blt_computes_bltforcausallm_logits_given_patch_lengths(ids, tmp_path):
    torch.manual_seed(1)
    hf = random_blt(tiny_hf_config(patch_in_forward=False, patching_mode="static", patch_size=3, max_patch_length=None))
    hf.save_pretrained(tmp_path / "blt")
    written = import_hf(tmp_path / "blt", tmp_path / "imported")
    assert "entropy" not in written, "a model without a patcher brings no entropy model"
    lm = load_lm(written["blt"])
    assert lm.patcher.config == PatchingConfig("static", patch_size=3)
    patches = lm.patch(ids, None, None)
    # An empty patch after the row: BltForCausalLM then takes the byte after it to start a patch, as ours does.
    with torch.no_grad():
        theirs = hf(ids, patch_lengths=F.pad(patches.lengths, (0, 1))).logits
        torch.testing.assert_close(lm(ids), theirs, **TOLERANCE)


def test_a_separate_entropy_model_in_any_of_its_formats(hf_blt, imported, ids, tmp_path):
    _, hf = hf_blt
    hf.model.patcher.save_pretrained(tmp_path / "patcher")  # the folder BltPatcher writes
    written = import_hf(hf_blt[0], tmp_path / "from_patcher", entropy_model=tmp_path / "patcher")
    with torch.no_grad():
        theirs = hf.model.patcher(ids)[0]
    torch.testing.assert_close(load_lm(written["blt"]).patcher.entropies(ids), theirs, **TOLERANCE)

    # The reference code's folders: its names are ours, its RoPE interleaved as transformers'.
    embedded = load_lm(imported["entropy"]).model
    args = {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seqlen": 64, "vocab_size": 260, "multiple_of": 32}
    hf_state = hf.model.patcher.state_dict()
    state = {ours: hf_state[theirs].contiguous() for ours, (theirs, _) in entropy_names(embedded.config, "").items()}
    training = tmp_path / "reference_training"  # as facebook/blt-1b's entropy_model/: the loader fixes a 512 window
    training.mkdir()
    (training / "params.json").write_text(json.dumps({"entropy_model": args}))
    torch.save({"model": state}, training / "consolidated.pth")
    hub = tmp_path / "reference_hub"  # as facebook/blt-entropy: LMTransformer.save_pretrained, the window in its args
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps({"args": args | {"sliding_window": 8}}))
    save_file(state, hub / "model.safetensors")
    for folder, window in ((training, 512), (hub, 8)):
        model = load_lm(import_hf(hf_blt[0], tmp_path / f"from_{folder.name}", entropy_model=folder)["entropy"]).model
        assert model.config == replace(embedded.config, sliding_window=window)
        assert all(torch.equal(w, embedded.state_dict()[name]) for name, w in model.state_dict().items())


def test_export_then_import_is_the_identity(hf_blt, imported, ids, tmp_path):
    folder, hf = hf_blt
    exported = export_hf(imported["blt"], tmp_path / "exported")
    original, again = load_file(folder / "model.safetensors"), load_file(exported / "model.safetensors")
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    reloaded, info = transformers.BltForCausalLM.from_pretrained(exported, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(ids).logits, hf(ids).logits)

    reimported = import_hf(exported, tmp_path / "reimported")
    for stage in ("blt", "entropy"):
        first, second = (torch.load(written[stage], weights_only=False) for written in (imported, reimported))
        assert first["hyper_parameters"]["model"] == second["hyper_parameters"]["model"]
        assert first["state_dict"].keys() == second["state_dict"].keys()
        assert all(torch.equal(w, second["state_dict"][name]) for name, w in first["state_dict"].items())


def test_export_and_import_write_over_nothing_unless_told(hf_blt, imported, tmp_path):
    from blt_lightning import hf_export, hf_import

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="taken: not empty; give a new directory, or --overwrite"):
        hf_export.main(["--checkpoint", str(imported["blt"]), "--output", str(taken)])
    with pytest.raises(SystemExit, match="taken: not empty; give a new directory, or --overwrite"):
        hf_import.main(["--model", str(hf_blt[0]), "--output", str(taken)])
    assert [p.name for p in taken.iterdir()] == ["config.json"] and (taken / "config.json").read_text() == "{}"
    hf_export.main(["--checkpoint", str(imported["blt"]), "--output", str(taken), "--overwrite"])
    assert json.loads((taken / "config.json").read_text())["model_type"] == "blt"
    # readable by whom config.json is (safetensors writes its file for its owner alone)
    assert (taken / "model.safetensors").stat().st_mode & 0o777 == (taken / "config.json").stat().st_mode & 0o777


def test_export_of_a_trained_checkpoint_gives_the_same_logits(small_corpus, ids, tmp_path):
    checkpoint = fit_one_step(tmp_path, small_corpus, "--model.init_args.model.doubled_cross_attn_residual", "true")
    hf = transformers.BltForCausalLM.from_pretrained(export_hf(checkpoint, tmp_path / "exported")).eval()
    lm = load_lm(checkpoint)
    with torch.no_grad():
        patches = lm.patch(ids, None, None)
        for row, lengths, next_starts in zip(ids, patches.lengths, patches.next_starts):
            # Given patch lengths, BltForCausalLM's last position reads its own patch when one more (empty) follows.
            theirs = hf(row[None], patch_lengths=F.pad(lengths[lengths > 0], (0, int(next_starts)))[None]).logits
            torch.testing.assert_close(lm(row[None]), theirs, **TOLERANCE)


@pytest.mark.parametrize("window", [None, 64])
def test_an_exported_patcher_sees_what_ours_does_when_the_context_is_shorter_than_the_window(imported, ids, window,
                                                                                           tmp_path):
    """Our patcher sees min(sliding window, stage-one row length) ids (entropy_window): so must the exported one,
    on rows longer than that."""
    checkpoint = torch.load(imported["blt"], weights_only=False)
    carried = checkpoint[CARRIED_ENTROPY_MODEL]
    carried["config"]["sliding_window"], carried["context"] = window, 16
    torch.save(checkpoint, tmp_path / "short_context.ckpt")
    lm = load_lm(tmp_path / "short_context.ckpt")
    assert lm.patcher.window == 16 < LENGTH
    hf = transformers.BltForCausalLM.from_pretrained(export_hf(tmp_path / "short_context.ckpt", tmp_path / "out"))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval().model.patcher(ids)[0], lm.patcher.entropies(ids), **TOLERANCE)


def test_what_the_other_side_cannot_compute_is_refused(hf_blt, tmp_path):
    broken = shutil.copytree(hf_blt[0], tmp_path / "broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken/config.json: not a model config"):
        import_hf(broken, tmp_path / "out")
    folder = shutil.copytree(hf_blt[0], tmp_path / "gqa")
    config = json.loads((folder / "config.json").read_text())
    config["encoder_config"]["num_key_value_heads"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"gqa/config.json: encoder_config.num_key_value_heads = 1: grouped-query"):
        import_hf(folder, tmp_path / "out")
    folder = shutil.copytree(hf_blt[0], tmp_path / "narrow")  # one tensor of a stacked weight the wrong width
    weights = load_file(folder / "model.safetensors")
    name = "model.global_transformer.layers.0.mlp.up_proj.weight"
    weights[name] = weights[name][:, :-1].contiguous()
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"narrow/model.safetensors: tensors = \['global_transformer.layers.0.feed_"
                                         r"forward.w3.weight'\]: shapes \[\(96, 47\)\] where the config says"):
        import_hf(folder, tmp_path / "out")
    cut = shutil.copytree(hf_blt[0], tmp_path / "cut")
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cut/model.safetensors: not a readable safetensors file"):
        import_hf(cut, tmp_path / "out")
    (cut / "model.safetensors").unlink()  # an index is read only where there is no model.safetensors
    for index in ("{not json", '{"metadata": {}}', '{"weight_map": ["model.safetensors"]}'):
        (cut / "model.safetensors.index.json").write_text(index)
        with pytest.raises(ValueError, match=r"cut/model.safetensors.index.json: not a safetensors index"):
            import_hf(cut, tmp_path / "out")
    with pytest.raises(ValueError, match=r"x.ckpt: model.doubled_cross_attn_residual = False"):
        hf_config_kwargs(BLTConfig(), PatchingConfig("static"), None, 1024, "x.ckpt")
    with pytest.raises(ValueError, match=r"x.ckpt: patching.mode = 'monotonic': BltConfig has no such patching"):
        hf_config_kwargs(BLTConfig(doubled_cross_attn_residual=True), PatchingConfig("monotonic"), None, 1024, "x.ckpt")


def test_a_separate_entropy_models_bad_files_are_named(hf_blt, tmp_path):
    _, hf = hf_blt
    patcher = tmp_path / "patcher"
    hf.model.patcher.save_pretrained(patcher)
    weights = load_file(patcher / "model.safetensors")
    weights["layers.0.mlp.up_proj.weight"] = weights["layers.0.mlp.up_proj.weight"][:, :-1].contiguous()
    save_file(weights, patcher / "model.safetensors")
    with pytest.raises(ValueError, match=r"patcher/model.safetensors: tensors = \['layers.0.feed_forward.w3.weight"):
        import_hf(hf_blt[0], tmp_path / "out", entropy_model=patcher)
    (patcher / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"patcher/config.json: not a model config"):
        import_hf(hf_blt[0], tmp_path / "out", entropy_model=patcher)
    reference = tmp_path / "reference"  # the reference code's training output
    reference.mkdir()
    (reference / "params.json").write_text("[]")
    (reference / "consolidated.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"reference/consolidated.pth: not a readable checkpoint"):
        import_hf(hf_blt[0], tmp_path / "out", entropy_model=reference)
    torch.save({"model": {}}, reference / "consolidated.pth")
    with pytest.raises(ValueError, match=r"reference/params.json: not the reference's params.json \(a JSON object"):
        import_hf(hf_blt[0], tmp_path / "out", entropy_model=reference)
    assert not (tmp_path / "out").exists()


def test_weights_beside_an_index_of_shards_are_read_as_transformers_reads_them(hf_blt, imported, ids, tmp_path):
    """As after an export over an earlier save in shards: model.safetensors, not the stale index and its shards."""
    folder, hf = hf_blt
    stale = shutil.copytree(folder, tmp_path / "stale")
    weights = load_file(folder / "model.safetensors")
    save_file({name: torch.zeros_like(w) for name, w in weights.items()}, stale / "model-00001-of-00001.safetensors")
    (stale / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(weights, "model-00001-of-00001.safetensors")}))
    with torch.no_grad():
        assert torch.equal(transformers.BltForCausalLM.from_pretrained(stale).eval()(ids).logits, hf(ids).logits)
    first = torch.load(imported["blt"], weights_only=False)["state_dict"]
    again = torch.load(import_hf(stale, tmp_path / "out")["blt"], weights_only=False)["state_dict"]
    assert first.keys() == again.keys() and all(torch.equal(w, again[name]) for name, w in first.items())


def test_an_export_that_cannot_write_its_weights_leaves_the_folder_as_it_was(imported, tmp_path):
    from blt_lightning import hf_export

    taken = tmp_path / "taken"
    (taken / "model.safetensors").mkdir(parents=True)  # where the weights must go
    (taken / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"export-hf: .*taken/model.safetensors"):
        hf_export.main(["--checkpoint", str(imported["blt"]), "--output", str(taken), "--overwrite"])
    assert sorted(p.name for p in taken.iterdir()) == ["config.json", "model.safetensors"]
    assert (taken / "config.json").read_text() == "{}"


def test_evaluate_and_generate_run_on_an_imported_checkpoint(imported, small_corpus, tmp_path, capsysbinary):
    report = evaluate(str(imported["blt"]), [str(small_corpus)], tmp_path, batch_size=4, accelerator="cpu", devices=1,
                      enable_progress_bar=False)
    assert report["model"] == "BLTLM" and 0 < report["bpb"] < 16 and report["mean_patch_size"] > 1
    generate(["--checkpoint", str(imported["blt"]), "--prompt", "doc", "--max-bytes", "8", "--temperature", "0",
              "--device", "cpu"])
    assert b"8 bytes in" in capsysbinary.readouterr().err  # the bytes drawn need not be UTF-8


def test_fit_with_init_from_starts_from_the_imported_weights(imported, small_corpus, tmp_path):
    module = BLTLM(BLTConfig(encoder_dim=32, global_dim=64, decoder_dim=32, encoder_heads=2, global_heads=2,
                             decoder_heads=2, global_layers=1, decoder_layers=1, ngram_table_size=11), seq_len=16,
                   init_from=str(tmp_path / "nope.ckpt"))
    module.setup("fit")  # the error waits for training to start: a checkpoint restored in between needs no init_from
    with pytest.raises(FileNotFoundError, match="nope.ckpt: init_from names no checkpoint"):
        module.on_train_start()
    # At learning rate 0, AdamW leaves the weights as they start: those of init_from, not a random init.
    trained = torch.load(fit_one_step(tmp_path, small_corpus, "--config", str(imported["finetune"]),
                                      "--model.init_args.optimizer.lr", "0"), weights_only=False)
    start = torch.load(imported["blt"], weights_only=False)
    # fine-tuning takes the imported rows, import-hf's --seq-len (those fit_one_step gives it come after)
    rows = start["hyper_parameters"]["seq_len"]
    assert yaml.safe_load(imported["finetune"].read_text())["data"] == {"init_args": {"seq_len": rows}}
    start = start["state_dict"]
    assert trained["global_step"] == 1 and trained["state_dict"].keys() == start.keys()
    assert all(torch.equal(w, trained["state_dict"][name]) for name, w in start.items())
