"""Real DDP on CPU, in a subprocess: 2 ranks x 2 DataLoader workers; and Lightning's FSDP, on CPU through a probe."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blt_lightning.data import read_manifest
from blt_lightning.prepare import MANIFEST
from blt_lightning.streams import shard_documents
from blt_lightning.vocab import BOS, encode
from fsdp_probe import MODELS

PROBE = Path(__file__).with_name("ddp_probe.py")
FSDP_PROBE = Path(__file__).with_name("fsdp_probe.py")


def test_ranks_and_workers_read_disjoint_data_covering_validation_once(shards, tmp_path):
    result = subprocess.run([sys.executable, str(PROBE), str(tmp_path), str(shards / MANIFEST)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # Training: the same number of batches on both ranks, two epochs of about one pass over the training
    # bytes each. Reader k of 4 (rank 0 runs readers 0 and 1, rank 1 readers 2 and 3) reads only shards
    # k, k + 4, ...; a row's recorded shard really holds the row's last document.
    manifest = json.loads((shards / MANIFEST).read_text())["splits"]
    train_ids = manifest["train"]["bytes"] + 2 * manifest["train"]["documents"]
    per_epoch = train_ids // (64 * 4 * 2)
    assert [len(r["train"]) for r in ranks] == [2 * per_epoch] * 2
    shard_ids = [torch.cat([encode(d) for d in shard_documents(s)])
                 for s in read_manifest(str(shards / MANIFEST))["train"]]
    for rank, r in enumerate(ranks):
        for batch in r["train"]:
            for shard, row in zip(batch["shard"].tolist(), batch["ids"]):
                assert shard % 4 in (2 * rank, 2 * rank + 1), f"rank {rank} read shard {shard}"
                starts = (row == BOS).nonzero().flatten()
                tail = row[starts[-1] :] if len(starts) else row
                assert _contains(shard_ids[shard], tail)
    read = [{s for b in r["train"] for s in b["shard"].tolist()} for r in ranks]
    assert len(read[0]) > 1 and len(read[1]) > 1

    # Validation: every row of every validation shard exactly once across ranks and workers (twice: 2 epochs).
    split = read_manifest(str(shards / MANIFEST))["validation"]
    rows = {}
    for r in ranks:
        batches = r["validation"]
        for b in batches[: len(batches) // 2]:  # the first epoch's validation
            for shard, number, ids in zip(b["shard"].tolist(), b["row"].tolist(), b["ids"]):
                if shard >= 0:
                    assert (shard, number) not in rows, "a validation row was read twice"
                    rows[(shard, number)] = ids
    assert len(ranks[0]["validation"]) == len(ranks[1]["validation"])
    for index, shard in enumerate(split):
        got = [rows[(index, n)] for n in range(shard.rows(64))]
        stream = torch.cat([got[0]] + [g[1:] for g in got[1:]])
        expected = torch.cat([encode(d) for d in shard_documents(shard)])
        assert torch.equal(stream[: len(expected)], expected)
    assert len(rows) == sum(s.rows(64) for s in split)
    assert 0 < ranks[0]["bpb"] == ranks[1]["bpb"], "the synced metric differs between ranks"
    # The printed report counts every validation byte, from all ranks.
    reports = re.findall(r"validation bpb ([0-9.]+) over ([0-9,]+) bytes", result.stdout)
    assert len(reports) == 2 and {int(n.replace(",", "")) for _, n in reports} == {manifest["validation"]["bytes"]}
    assert float(reports[-1][0]) == pytest.approx(ranks[0]["bpb"], abs=1e-4)


def _contains(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    n = len(needle)
    if n == 0 or n > len(haystack):
        return False
    windows = haystack.unfold(0, n, 1)
    return bool((windows == needle).all(-1).any())


@pytest.mark.parametrize("stage", ["entropy", "blt"])
def test_fsdp_trains_with_lightnings_model_summary_and_decays_the_same_weights(stage, shards, tmp_path):
    """Lightning's FSDP (on CPU through tests/fsdp_probe.py): its model summary runs after the wrapping, and the
    optimizer is made then too, where every weight is a 1-D slice of a flat shard; yet the matrices decay and
    the norms' gains do not, as without FSDP."""
    result = subprocess.run([sys.executable, str(FSDP_PROBE), str(tmp_path), str(shards / MANIFEST), stage],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["step"] for r in ranks] == [2, 2]
    model = MODELS[stage]()
    gains = sum(p.numel() for name, p in model.named_parameters() if name.endswith("norm.weight"))
    decayed = sum(p.numel() for p in model.parameters()) - gains
    for decay, expected in ((0.1, decayed), (0.0, gains)):  # each rank holds its shard of every weight
        assert sum(g["elements"] for r in ranks for g in r["groups"] if g["weight_decay"] == decay) == expected
