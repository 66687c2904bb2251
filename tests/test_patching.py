import gzip
import json
from pathlib import Path

import pytest
import torch

from blt_lightning.models import EntropyModel, EntropyModelConfig
from blt_lightning.patcher import Patcher
from blt_lightning.patching import PatchingConfig, patch, patch_starts
from blt_lightning.vocab import BOS, EOS, PAD, decode, encode

LOW, HIGH = 0.5, 3.0
CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"


def pieces(ids: torch.Tensor, starts: torch.Tensor) -> list[list[int]]:
    """The ids of each patch of one row."""
    cuts = starts.nonzero().flatten().tolist() + [len(ids)]
    return [ids[a:b].tolist() for a, b in zip(cuts, cuts[1:])]


def texts(ids, starts) -> list[bytes]:
    return [decode(torch.tensor(p)) for p in pieces(ids, starts)]


def test_the_papers_example():
    text = b"... by George R.R. Martin"
    ids = encode(text)
    h = torch.full((len(ids),), LOW)
    g = text.index(b"G") + 1  # position of "G" (after BOS)
    h[g - 1] = HIGH  # hard to predict what follows "by ": "G" starts a patch
    h[g] = HIGH  # and what follows "G": so "G" is a patch of one byte
    h[g + 5] = HIGH  # hard to predict what follows "eorge": the space starts the next patch
    starts = patch_starts(ids[None], PatchingConfig(threshold=1.0), h[None])[0]
    assert texts(ids, starts) == [b"", b"... by ", b"G", b"eorge", b" R.R. Martin"]
    assert pieces(ids, starts)[0] == [BOS] and pieces(ids, starts)[-1][-1] == EOS


def test_bos_alone_and_second_position_starts_whatever_the_entropies():
    ids = encode(b"abcdef")
    for h in (torch.full((8,), HIGH), torch.full((8,), LOW)):
        starts = patch_starts(ids[None], PatchingConfig(threshold=1.0), h[None])[0]
        assert starts[:2].tolist() == [True, True]
    high = patch_starts(ids[None], PatchingConfig(threshold=1.0), torch.full((1, 8), HIGH))[0]
    assert high.all(), "high entropy everywhere: every byte starts a patch"


def test_monotonic_and_combined_modes():
    ids = encode(b"abcdefgh")
    #                    BOS  a    b    c    d    e    f    g    h    EOS
    h = torch.tensor([[1.0, 1.0, 1.5, 1.6, 0.2, 2.5, 2.4, 2.6, 0.1, 0.1]])
    mono = patch_starts(ids[None], PatchingConfig(mode="monotonic", relative_threshold=0.3), h)[0]
    # byte t starts a patch when H(t-1) - H(t-2) > 0.3: rises into b (1.5 - 1.0) and into e (2.5 - 0.2)
    assert mono.nonzero().flatten().tolist() == [0, 1, 3, 6]
    glob = patch_starts(ids[None], PatchingConfig(threshold=2.0), h)[0]
    assert glob.nonzero().flatten().tolist() == [0, 1, 6, 7, 8]
    both = patch_starts(ids[None], PatchingConfig(mode="combined", threshold=2.0, relative_threshold=0.3), h)[0]
    assert both.nonzero().flatten().tolist() == [0, 1, 6]  # the only rise that is also high
    with pytest.raises(ValueError, match="calibrate"):
        PatchingConfig(mode="combined")
    for bad in ({"threshold": float("nan")}, {"relative_threshold": float("inf")}):  # a NaN would patch nothing
        with pytest.raises(ValueError, match=r"patching\.\w+ must be a finite number"):
            PatchingConfig(mode="combined", **{"threshold": 1.0, **bad})


def test_max_patch_length_cuts_long_patches():
    ids = encode(b"x" * 11)
    starts = patch_starts(ids[None], PatchingConfig(threshold=1.0, max_patch_length=4), torch.full((1, 13), LOW))[0]
    assert [len(p) for p in pieces(ids, starts)] == [1, 4, 4, 4]  # BOS, then 12 ids (11 bytes + EOS) in fours
    static = patch_starts(ids[None], PatchingConfig(mode="static", patch_size=5, max_patch_length=3))[0]
    assert [len(p) for p in pieces(ids, static)] == [1, 3, 2, 3, 2, 2]


def test_patches_never_span_documents_and_ignore_other_documents():
    first, second = encode(b"one document"), encode(b"then another")
    ids = torch.cat([first, second])[None]
    h = torch.full(ids.shape, LOW)
    h[0, len(first) - 1] = HIGH  # EOS of the first document "predicts" the second's BOS: must not matter
    starts = patch_starts(ids, PatchingConfig(threshold=1.0), h)[0]
    assert texts(ids[0], starts) == [b"", b"one document", b"", b"then another"]
    changed = h.clone()
    changed[0, : len(first)] = HIGH
    again = patch_starts(ids, PatchingConfig(threshold=1.0), changed)[0]
    assert torch.equal(starts[len(first) :], again[len(first) :])


def test_empty_and_one_byte_documents_and_padding():
    ids = torch.cat([encode(b""), encode(b"x"), encode(b"yz"), torch.full((5,), PAD)])[None]
    starts = patch_starts(ids, PatchingConfig(threshold=1.0), torch.full(ids.shape, LOW))[0]
    assert pieces(ids[0], starts) == [[BOS], [EOS], [BOS], [ord("x") + 4, EOS], [BOS],
                                      [ord("y") + 4, ord("z") + 4, EOS], [PAD] * 5]
    patches = patch(ids, PatchingConfig(threshold=1.0, max_patch_length=2), torch.full(ids.shape, LOW))
    assert patches.lengths[0].tolist() == [1, 1, 1, 2, 1, 2, 1, 5]  # padding is never cut
    assert patches.padding[0].tolist() == [False] * 7 + [True]
    assert patches.mean_size == pytest.approx(3 / 2)  # bytes x, y, z in [x EOS] and [y z]


def test_a_row_that_starts_inside_a_document():
    ids = torch.cat([encode(b"tail of a document")[5:], encode(b"next")])[None]
    starts = patch_starts(ids, PatchingConfig(mode="byte"), None)[0]
    assert starts.all()
    static = patch_starts(ids, PatchingConfig(mode="static", patch_size=3))[0]
    assert [len(p) for p in pieces(ids[0], static)][:4] == [1, 3, 3, 3]


def test_space_mode_follows_the_reference():
    ids = encode(b"hello, world  x")
    starts = patch_starts(ids[None], PatchingConfig(mode="space"))[0]
    assert texts(ids, starts) == [b"", b"hello,", b" world ", b" x"]
    # UTF-8 lead bytes are spacelike and continuation bytes are not, so the reference cuts after the
    # second character's lead byte (the first one follows BOS, which is spacelike too).
    cjk = encode("字节".encode())
    assert texts(cjk, patch_starts(cjk[None], PatchingConfig(mode="space"))[0]) == [b"", "字".encode() + b"\xe8",
                                                                                     b"\x8a\x82"]


def test_static_and_byte_modes():
    ids = encode(b"abcdefghij")
    static = patch_starts(ids[None], PatchingConfig(mode="static", patch_size=4))[0]
    assert texts(ids, static) == [b"", b"abcd", b"efgh", b"ij"]
    assert patch_starts(ids[None], PatchingConfig(mode="byte"))[0].all()


def test_patch_ids_lengths_mask_and_budget():
    ids = torch.stack([encode(b"abcdefgh"), torch.cat([encode(b"ab"), torch.full((6,), PAD)])])
    patches = patch(ids, PatchingConfig(mode="static", patch_size=3))
    assert patches.lengths.tolist() == [[1, 3, 3, 3], [1, 3, 6, 0]]
    assert patches.mask.tolist() == [[True] * 4, [True, True, True, False]]
    assert patches.patch_ids[1].tolist() == [0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert patches.padding.tolist() == [[False] * 4, [False, False, True, False]]
    assert patches.mean_size == pytest.approx((8 + 2) / 4)  # bytes over patches holding bytes
    assert patch(ids, PatchingConfig(mode="static", patch_size=3), num_patches=6).lengths.shape == (2, 6)
    with pytest.raises(ValueError, match="budget of 3"):
        patch(ids, PatchingConfig(mode="static", patch_size=3), num_patches=3)


def sharp_model(seed=0, window=None):
    torch.manual_seed(seed)
    model = EntropyModel(EntropyModelConfig(dim=32, n_layers=2, n_heads=4, sliding_window=window)).eval()
    with torch.no_grad():
        model.output.weight.mul_(40.0)  # spread entropies out, as a trained model's are
    return model


@pytest.mark.parametrize("changed_row", [0, 1, 2])
def test_a_rows_patches_do_not_depend_on_other_rows(changed_row):
    """Also catches the reference's leak (its issue #123), where flattening rows into shared chunks lets
    an earlier row's bytes reach the next row's entropies."""
    patcher = Patcher(PatchingConfig(threshold=1.43), sharp_model(), context=64)
    rows = torch.stack([encode(b"first row of this batch, then " * 2)[4:44],
                        encode(b"the middle row is checked too " * 2)[:40],
                        encode(b"last row; rows start anywhere " * 2)[5:45]])
    other = rows.clone()
    other[changed_row] = torch.randint(4, 260, (40,))
    h1, h2 = patcher.entropies(rows), patcher.entropies(other)
    for row in {0, 1, 2} - {changed_row}:
        torch.testing.assert_close(h1[row], h2[row], rtol=0, atol=1e-5)
        torch.testing.assert_close(h1[row], patcher.entropies(rows[row : row + 1])[0], rtol=0, atol=1e-5)
        assert torch.equal(patcher(rows).starts[row], patcher(other).starts[row])


def test_patches_do_not_depend_on_the_trainers_autocast():
    """Under bf16-mixed the trainer runs the patcher (and an entropy model's predict) inside bf16 autocast;
    entropies, and so patches, are still the float32 ones that calibrate and the entropies command compute."""
    patcher = Patcher(PatchingConfig(threshold=1.43), sharp_model(), context=64)
    rows = torch.stack([encode(b"autocast leaves the entropy model alone " * 3)[:100], torch.randint(4, 260, (100,))])
    plain, streamed = patcher.entropies(rows), patcher.model.document_entropies(rows[0], window=64, chunk=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(patcher.entropies(rows), plain)
        assert torch.equal(patcher(rows).starts, patch(rows, patcher.config, plain).starts)
        assert torch.equal(patcher.model.document_entropies(rows[0], window=64, chunk=40), streamed)


def real_documents(n_bytes: int, source: str = "en_moby_dick") -> list[bytes]:
    """Documents of a shared corpus, in order, until n_bytes."""
    path = CORPORA / f"{source}.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} is not here (the shared corpora sit beside the repository)")
    docs, size = [], 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line)["text"].encode())
            size += len(docs[-1])
            if size >= n_bytes:
                return docs
    raise AssertionError(f"{path} holds fewer than {n_bytes} bytes")


def real_text(n_bytes: int) -> bytes:
    return b"".join(real_documents(n_bytes))[:n_bytes]


@pytest.mark.parametrize("config", [
    PatchingConfig(threshold=1.43, max_patch_length=12),  # about this model's median entropy
    PatchingConfig(mode="monotonic", relative_threshold=0.2),
    PatchingConfig(mode="combined", threshold=1.3, relative_threshold=0.0),
    PatchingConfig(mode="space", max_patch_length=5),
    PatchingConfig(mode="static", patch_size=6),
], ids=lambda c: c.mode)
def test_incremental_decides_what_the_batch_patcher_decides(config):
    data = real_text(3000)
    # a row that starts inside a document, then two documents, then padding
    ids = torch.cat([encode(data[:500])[40:], encode(data[500:2000]), encode(data[2000:]), torch.full((30,), PAD)])
    patcher = Patcher(config, sharp_model(window=None), context=48)  # a window much shorter than the text
    batch = patcher(ids[None]).starts[0]
    incremental = patcher.incremental()
    assert [incremental.append(i) for i in ids.tolist()] == batch.tolist()
    assert 0.1 < batch.float().mean() < 0.9, "a test of boundaries needs boundaries"


@pytest.mark.parametrize("config", [
    PatchingConfig(threshold=1.25 - 1e-9),  # 1.25 in float32: the entropy 1.25 is not above it
    PatchingConfig(mode="monotonic", relative_threshold=1.0 - 1e-9),  # 1.0 in float32: 1.25 - 0.25 is not above it
], ids=lambda c: c.mode)
def test_incremental_compares_with_the_thresholds_as_the_batch_patcher_does(config):
    """In float32, also for a threshold within float32 rounding of an entropy (or of a difference of two)."""
    entropies = torch.tensor([[0.5, 0.25, 1.25, 0.5, 0.25, 1.25, 2.0, 0.5, 0.5]])
    ids = torch.tensor([[BOS, *b"patching"]])
    batch = patch_starts(ids, config, entropies)[0]
    incremental = Patcher(config, sharp_model(window=None), context=48).incremental()
    given = iter(entropies[0].tolist())
    incremental._entropy = lambda next_id: next(given)  # the batch's entropies, not the model's
    assert [incremental.append(i) for i in ids[0].tolist()] == batch.tolist()
    assert not batch[3] and not batch[6]  # after the entropies 1.25 (at 2 and 5): no patch in either


def test_empty_rows_and_batches():
    for ids in (torch.empty(2, 0, dtype=torch.long), torch.empty(0, 5, dtype=torch.long)):
        patches = patch(ids, PatchingConfig(mode="byte"))
        assert patches.starts.shape == ids.shape and patches.mean_size == 0.0
