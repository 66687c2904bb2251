import shutil
from dataclasses import asdict

import lightning as L
import pytest
import torch
from test_blt_model import TINY
from test_patching import sharp_model

from blt_lightning import BLTLM, ByteShardDataModule
from blt_lightning.data import read_manifest
from blt_lightning.errors import BadInput
from blt_lightning.patcher import Patcher, weights_sha256
from blt_lightning.patching import PatchingConfig, segment_starts
from blt_lightning.prepare import MANIFEST
from blt_lightning.store_entropies import main, store_entropies
from blt_lightning.streams import EvalStream, TrainStream, shard_documents
from blt_lightning.vocab import BOS, PAD


def save_checkpoint(model, seq_len: int, path):
    """A checkpoint in the shape EntropyLM writes, for a model built here."""
    torch.save({"hyper_parameters": {"model": asdict(model.config), "seq_len": seq_len},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture
def stored(shards, tmp_path):
    model = sharp_model(window=16)
    checkpoint = save_checkpoint(model, 64, tmp_path / "entropy.ckpt")
    manifest = store_entropies(str(checkpoint), str(shards / MANIFEST), str(tmp_path / "with_entropies"))
    return model, tmp_path / "with_entropies" / MANIFEST, manifest


def test_new_shards_hold_the_same_documents(stored, shards):
    _, path, manifest = stored
    assert manifest["entropies"]["window"] == 16
    old, new = read_manifest(str(shards / MANIFEST)), read_manifest(str(path))
    for split in old:
        assert [d for s in old[split] for d in shard_documents(s)] == [d for s in new[split]
                                                                           for d in shard_documents(s)]


def test_patches_from_stored_entropies_equal_patches_on_the_fly(stored):
    model, path, _ = stored
    split = read_manifest(str(path))["validation"]
    batches = list(EvalStream(split, 1024, 2, 0, 1, 0))  # rows of several documents: most start in a row
    ids, stored_h = torch.cat([b["ids"] for b in batches]), torch.cat([b["entropies"] for b in batches])
    fresh_h = Patcher(PatchingConfig(mode="byte"), model, context=64).entropies(ids)
    threshold = float(fresh_h.median())
    config = PatchingConfig(threshold=threshold)
    patcher = Patcher(config, model, context=64)
    from_store, on_the_fly = patcher(ids, entropies=stored_h).starts, patcher(ids).starts
    # A row's first segment, when it continues a document, has no earlier bytes on the fly: compare the
    # documents that start in the row, where both see the same bytes.
    whole = torch.cumsum(ids == BOS, dim=-1) > 0
    # float16 ties: a stored entropy may round to the other side of the threshold
    tie = _shift(((fresh_h - threshold).abs() < 4e-3), 1)
    differ = (from_store != on_the_fly) & whole
    assert not (differ & ~tie).any()
    real = ids != PAD
    assert whole[real].float().mean() > 0.5 and from_store[whole & real].float().mean() > 0.2
    assert segment_starts(ids).sum() > len(ids)  # rows hold several documents


def test_training_batches_carry_entropies(stored):
    _, path, _ = stored
    stream = TrainStream(read_manifest(str(path))["train"], 32, 2, 0, 1, 0, shuffle_rows=4, mix_shards=2,
                         batches_per_epoch=3)
    for batch in stream:
        assert batch["entropies"].shape == batch["ids"].shape == (2, 33)
        assert (batch["entropies"] >= 0).all()


def test_stage_two_refuses_entropies_stored_by_another_entropy_model(stored, tmp_path):
    _, path, manifest = stored
    assert manifest["entropies"]["weights_sha256"]
    other = save_checkpoint(sharp_model(seed=1, window=16), 64, tmp_path / "other.ckpt")

    def fit(checkpoint):
        module = BLTLM(TINY, PatchingConfig(mode="entropy", threshold=1.0), entropy_checkpoint=str(checkpoint),
                       seq_len=32)
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(module, ByteShardDataModule(manifest=str(path), seq_len=32, batch_size=2))
        return trainer

    with pytest.raises(BadInput, match=rf"{path}: its stored entropies were computed by the entropy model of "
                                       rf".*entropy\.ckpt, whose weights are not those of .*other\.ckpt"):
        fit(other)
    assert fit(tmp_path / "entropy.ckpt").global_step == 1  # the model that stored them


def test_bad_input_is_a_clear_error(shards, tmp_path, stored):
    with pytest.raises(SystemExit, match="not a stage-one"):
        main(["--checkpoint", str(shards / MANIFEST), "--manifest", str(shards / MANIFEST),
              "--output", str(tmp_path / "x")])
    checkpoint = save_checkpoint(sharp_model(window=16), 64, tmp_path / "again.ckpt")
    with pytest.raises(SystemExit, match="another directory"):
        main(["--checkpoint", str(checkpoint), "--manifest", str(shards / MANIFEST), "--output", str(shards)])

    out = tmp_path / "with_entropies"  # what `stored` wrote
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit, match="with_entropies: not empty; give a new directory, or --overwrite"):
        main(["--checkpoint", str(checkpoint), "--manifest", str(shards / MANIFEST), "--output", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    bad = shutil.copytree(shards, tmp_path / "bad")
    cut = sorted(bad.glob("validation-*.tar"))[0]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with pytest.raises(SystemExit, match=rf"{cut.name}: (corrupt|truncated) shard"):
        main(["--checkpoint", str(checkpoint), "--manifest", str(bad / MANIFEST), "--output", str(tmp_path / "y")])
    assert not list((tmp_path / "y").iterdir()), "a failed run left files behind"
    # Over an earlier output, a run that fails midway leaves that output as it was, its manifest and shards usable.
    with pytest.raises(SystemExit, match=rf"{cut.name}: (corrupt|truncated) shard"):
        main(["--checkpoint", str(checkpoint), "--manifest", str(bad / MANIFEST), "--output", str(out), "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _shift(x: torch.Tensor, by: int) -> torch.Tensor:
    return torch.cat([torch.zeros_like(x[:, :by]), x[:, :-by]], dim=-1)


def test_padding_batches_keep_the_entropies_key(stored):
    _, path, _ = stored
    split = read_manifest(str(path))["validation"]
    per_rank = [list(EvalStream(split, 64, 4, rank, 2, 0)) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    assert all("entropies" in b and b["entropies"].shape == b["ids"].shape for batches in per_rank for b in batches)


def test_the_fingerprint_of_an_entropy_model_is_that_of_its_bf16_copy():
    """A bf16-true run carries its entropy model in bfloat16: resuming from it is the model that stored entropies."""
    model = sharp_model(window=16)
    rounded = sharp_model(window=16).to(torch.bfloat16).float()
    assert weights_sha256(model) == weights_sha256(rounded) != weights_sha256(sharp_model(seed=1, window=16))
