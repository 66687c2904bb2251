import subprocess
import sys
import warnings
from dataclasses import replace

import pytest
import torch
from conftest import kept_for_backward

from blt_lightning.models import EntropyModel, EntropyModelConfig
from blt_lightning.models.blt import BLTConfig, ByteLatentTransformer, decoder_patch_ids, ngram_hashes
from blt_lightning.models.layers import TransformerBlock
from blt_lightning.patcher import Patcher
from blt_lightning.patching import PatchingConfig
from blt_lightning.vocab import BOS, EOS, OFFSET, PAD, VOCAB_SIZE, encode

TINY = BLTConfig(encoder_dim=32, encoder_layers=1, encoder_heads=2, global_dim=64, global_layers=2, global_heads=4,
                 decoder_dim=32, decoder_layers=2, decoder_heads=2, local_window=8, ngram_sizes=(3, 4, 5),
                 ngram_table_size=101, ffn_multiple_of=16)
MODES = [
    PatchingConfig(threshold=5.52, max_patch_length=6),
    PatchingConfig(mode="monotonic", relative_threshold=0.0),
    PatchingConfig(mode="combined", threshold=5.52, relative_threshold=0.0),
    PatchingConfig(mode="static", patch_size=3),
    PatchingConfig(mode="space"),
    PatchingConfig(mode="byte"),
]


def blt(config=TINY, seed=0):
    torch.manual_seed(seed)
    return ByteLatentTransformer(config).eval()


def patcher_for(config: PatchingConfig, seed: int = 0) -> Patcher:
    torch.manual_seed(seed + 100)
    entropy_model = EntropyModel(EntropyModelConfig(dim=16, n_layers=1, n_heads=2, sliding_window=8)).eval()
    return Patcher(config, entropy_model, context=32)


def printable(n: int, g: torch.Generator) -> bytes:
    return bytes(torch.randint(32, 127, (n,), generator=g).tolist())


def rows(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = lambda n: printable(n, g)
    first = torch.cat([encode(text(13)), encode(text(20))])  # two documents
    second = torch.cat([encode(text(9))[4:], encode(b"a b c"), encode(text(25))])  # starts inside a document
    L = max(len(first), len(second))
    pad = lambda r: torch.cat([r, torch.full((L - len(r),), PAD)])
    return torch.stack([pad(first), pad(second)])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("config", MODES, ids=lambda c: c.mode)
def test_a_later_byte_never_changes_earlier_logits(config, seed):
    model, patcher = blt(seed=seed), patcher_for(config, seed)
    ids = rows(seed)
    patches = patcher(ids)
    assert patches.lengths.shape[1] > 3
    logits = model(ids, patches)
    g = torch.Generator().manual_seed(seed)
    eos = (ids[0] == EOS).nonzero().flatten().tolist()
    patch_ends = (patches.starts[0].nonzero().flatten() - 1).tolist()
    for t in sorted({3, 10, eos[0], patch_ends[2], patch_ends[-1], ids.shape[1] - 3}):
        changed = ids.clone()
        later_bytes = (changed >= OFFSET) & (torch.arange(ids.shape[1]) > t)
        changed[later_bytes] = torch.randint(OFFSET, VOCAB_SIZE, (int(later_bytes.sum()),), generator=g)
        out = model(changed, patcher(changed))
        torch.testing.assert_close(out[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-5, msg=f"position {t}")
        assert not torch.allclose(out[later_bytes], logits[later_bytes]), "the change must be visible after t"


def test_decoder_reads_the_latest_complete_patch():
    ids = encode(b"abcdefg")  # BOS a b c d e f g EOS: patches [BOS] [a b c] [d e f] [g EOS]
    patches = patcher_for(PatchingConfig(mode="static", patch_size=3))(ids[None])
    assert patches.lengths[0].tolist() == [1, 3, 3, 2]
    # byte i reads patch d for i in [last byte of d, second-to-last byte of d + 1]; EOS its own
    assert decoder_patch_ids(patches)[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3]
    # A row that ends inside a patch: "f" would continue [d e], so "e" still reads [a b c]. One that ends
    # where a patch would begin: "d" starts the next, so "c" reads its own patch.
    for text, expected in ((b"abcde", [0, 0, 0, 1, 1, 1]), (b"abc", [0, 0, 0, 1])):
        row = encode(text)[None, :-1]
        found = patcher_for(PatchingConfig(mode="static", patch_size=3))(row)
        assert decoder_patch_ids(found)[0].tolist() == expected


@pytest.mark.parametrize("config", MODES, ids=lambda c: c.mode)
def test_ids_after_an_eos_never_reach_it(config):
    """Rows follow EOS with BOS or padding; bytes there instead, in EOS's patch, still cannot change it."""
    model, patcher = blt(), patcher_for(config)
    g = torch.Generator().manual_seed(5)
    ids = torch.cat([encode(b"naive patches, hashed"), torch.randint(OFFSET, VOCAB_SIZE, (12,), generator=g)])[None]
    eos = int((ids[0] == EOS).nonzero())
    logits = model(ids, patcher(ids))
    changed = ids.clone()
    changed[0, eos + 1 :] = torch.randint(OFFSET, VOCAB_SIZE, (ids.shape[1] - eos - 1,), generator=g)
    torch.testing.assert_close(model(changed, patcher(changed))[:, : eos + 1], logits[:, : eos + 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("config", MODES, ids=lambda c: c.mode)
def test_a_documents_logits_do_not_depend_on_the_documents_before_it(config):
    """Neither attention nor hash n-grams reach into the document before: a document packed after others
    has the logits it has alone in a row (and so when generated)."""
    model, patcher = blt(), patcher_for(config)
    g = torch.Generator().manual_seed(3)
    doc = encode(printable(30, g))
    alone = model(doc[None], patcher(doc[None]))[0]
    for before in (encode(printable(12, g)), encode(printable(17, g))):
        row = torch.cat([before, doc])[None]
        torch.testing.assert_close(model(row, patcher(row))[0, len(before) :], alone, rtol=0, atol=1e-5)


def reference_hash(window: list[int], prime: int, table: int) -> int:
    """sum_j id_j * prime^j (j = 0 the oldest) in wrapping signed 64-bit arithmetic, then modulo table."""
    wrap = lambda x: (x + 2**63) % 2**64 - 2**63
    total = 0
    for j, token in enumerate(window):
        total = wrap(total + wrap(token * wrap(prime**j)))
    return total % table


@pytest.mark.parametrize("n", [3, 8])
@pytest.mark.parametrize("prime", [1000000007, 5915587277])
def test_hash_ngram_indices_equal_the_formula(n, prime):
    ids = encode("naïve bytes 字节, hashed".encode())[None]
    got = ngram_hashes(ids, ((prime, n),), 500_002)[0, :, 0].tolist()
    assert ngram_hashes(ids, ((prime, n), (prime, 2)), 500_002)[0, :, 0].tolist() == got  # alongside a shorter n-gram
    padded = [0] * (n - 1) + ids[0].tolist()
    assert got == [reference_hash(padded[i : i + n], prime, 500_002) for i in range(ids.shape[1])]
    assert max(got) < 500_002 and min(got) >= 0


def test_gradients_reach_every_parameter():
    model = blt().train()
    ids = rows(0)
    patches = patcher_for(PatchingConfig(mode="static", patch_size=3))(ids)
    logits = model(ids[:, :-1], patcher_for(PatchingConfig(mode="static", patch_size=3))(ids[:, :-1]))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing and patches.mask.any()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_residual_streams_keep_the_weights_dtype_under_autocast(train):
    """bf16-mixed: every stream starts in float32 (embeddings) and stays so, though the projections between
    the models compute in bf16; the norms that read them get their weights' dtype (no unfused-kernel
    warning). A model cast to bf16 (bf16-true) runs in bf16 throughout. Every width differs here, so each
    projection between streams is there."""
    config = replace(TINY, encoder_dim=32, global_dim=48, global_heads=4, decoder_dim=24, decoder_heads=2)
    model = blt(config).train(train)
    ids = rows(0)
    patches = patcher_for(PatchingConfig(mode="static", patch_size=3))(ids)
    stream_dtypes = []
    for block in model.modules():
        if isinstance(block, TransformerBlock):
            block.register_forward_pre_hook(lambda block, args: stream_dtypes.append(args[0].dtype))
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("error")
        logits = model(ids, patches)
    assert stream_dtypes == [torch.float32] * 5 and torch.isfinite(logits).all()
    stream_dtypes.clear()
    assert model.bfloat16()(ids, patches).dtype == torch.bfloat16
    assert stream_dtypes == [torch.bfloat16] * 5


@pytest.mark.parametrize("ids", [
    torch.stack([encode(b"x"), encode(b"y")]),  # one-byte documents
    torch.cat([encode(b"z" * 30)])[None],  # patches cut by max_patch_length
    torch.stack([encode(b"ab cd ef gh ij kl"), encode(b"abcdefghijklmnopq")]),  # unequal patch counts
    torch.stack([encode(b"some text here"), torch.full((16,), PAD)]),  # a row that is all padding
], ids=["one-byte", "max-length", "unequal", "all-padding"])
def test_edge_cases_give_finite_logits(ids):
    patches = patcher_for(PatchingConfig(mode="space", max_patch_length=4))(ids)
    assert patches.lengths[~patches.padding].max() <= 4
    logits = blt()(ids, patches)
    assert logits.shape == (*ids.shape, VOCAB_SIZE) and torch.isfinite(logits).all()


def test_a_tiny_model_overfits_one_batch():
    model = blt().train()
    ids = rows(3)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    # Every document's BOS sees the same (nothing before it in its document): its first byte is not learnable.
    targets = targets.masked_fill(inputs == BOS, PAD)
    patches = patcher_for(PatchingConfig(mode="space"))(inputs)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(inputs, patches).flatten(0, 1), targets.flatten(),
                                                 ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_sdpa_and_flex_attention_agree():
    pytest.importorskip("torch.nn.attention.flex_attention", reason="this PyTorch has no FlexAttention")
    ids = rows(4)
    patches = patcher_for(PatchingConfig(mode="static", patch_size=3))(ids)
    sdpa = blt(TINY)
    flex = blt(replace(TINY, attention="flex"))
    flex.load_state_dict(sdpa.state_dict())
    with torch.no_grad():  # FlexAttention has no backward on CPU
        torch.testing.assert_close(flex(ids, patches), sdpa(ids, patches), rtol=1e-4, atol=1e-4)


def test_a_patch_budget_pads_without_changing_outputs():
    ids = rows(5)
    patcher = patcher_for(PatchingConfig(mode="space"))
    patches = patcher(ids)
    budget = patcher(ids, num_patches=patches.lengths.shape[1] + 7)
    assert budget.lengths.shape[1] == patches.lengths.shape[1] + 7
    model = blt()
    torch.testing.assert_close(model(ids, budget), model(ids, patches), rtol=0, atol=1e-5)


@pytest.mark.parametrize("window, block", [(3, 256), (8, 3), (64, 5), (None, 4)],
                         ids=["window-3", "window-8-blocks-of-3", "window-over-row", "no-window"])
@pytest.mark.parametrize("config", MODES, ids=lambda c: c.mode)
def test_sdpa_attention_equals_dense_attention(config, window, block, monkeypatch):
    """The sdpa path (self-attention in blocks, cross-attention by gathers) gives the logits and gradients of
    dense masks: two documents in a row, a row starting inside one, padding, a row of padding only, padding
    patches (a patch budget), rows of 41 ids (no multiple of a block), windows within and over the row."""
    monkeypatch.setattr("blt_lightning.models.attention.BLOCK", block)
    ids = torch.cat([rows(6), torch.full((1, rows(6).shape[1]), PAD)])
    patcher = patcher_for(config)
    patches = patcher(ids, num_patches=patcher(ids).lengths.shape[1] + 3)
    weights = torch.randn(*ids.shape, VOCAB_SIZE, generator=torch.Generator().manual_seed(1))
    results = []
    for attention in ("sdpa", "dense"):
        model = blt(replace(TINY, local_window=window, attention=attention)).train()
        logits = model(ids, patches)
        (logits * weights).sum().backward()
        results.append((logits, {name: p.grad for name, p in model.named_parameters()}))
    (sdpa, sdpa_grads), (dense, dense_grads) = results
    torch.testing.assert_close(sdpa, dense, rtol=1e-5, atol=1e-6)
    for name, grad in dense_grads.items():  # within 1e-4 of each gradient's largest entry
        torch.testing.assert_close(sdpa_grads[name], grad, rtol=0, atol=1e-4 * float(grad.abs().max()) + 1e-9, msg=name)


def test_activation_checkpointing_gives_the_same_gradients_keeping_less_for_backward():
    from blt_lightning import BLTLM

    ids = rows(0)
    patches = patcher_for(PatchingConfig(mode="static", patch_size=3))(ids[:, :-1])

    def gradients_and_kept_bytes(recompute):
        lm = BLTLM(TINY, seq_len=ids.shape[1] - 1, activation_checkpointing=recompute)
        lm.model.load_state_dict(blt().state_dict())
        lm.configure_model()  # where the option reaches the blocks
        logits, kept = kept_for_backward(lambda: lm.model(ids[:, :-1], patches))
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        return {n: p.grad for n, p in lm.model.named_parameters()}, kept, lm.model

    plain, plain_kept, _ = gradients_and_kept_bytes(False)
    recomputed, recomputed_kept, _ = gradients_and_kept_bytes(True)
    assert recomputed.keys() == plain.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=0, atol=0, msg=name)
    assert recomputed_kept < 0.5 * plain_kept
    # only the SwiGLU hidden of the blocks over bytes: the global transformer's keep theirs
    hidden, hidden_kept, model = gradients_and_kept_bytes("byte_feed_forward")
    assert [b.feed_forward.recompute_hidden for b in model.modules() if isinstance(b, TransformerBlock)] == [
        True, False, False, True, True]  # encoder, global (2), decoder (2)
    for name, grad in plain.items():
        torch.testing.assert_close(hidden[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    gate_up_bytes = ids[:, :-1].numel() * 2 * TINY.encoder_hidden * 4
    assert plain_kept - hidden_kept == 3 * gate_up_bytes  # three blocks over bytes, all of the same width
    # every block's: the global transformer's too, over its patches
    every, every_kept, model = gradients_and_kept_bytes("feed_forward")
    assert all(b.feed_forward.recompute_hidden for b in model.modules() if isinstance(b, TransformerBlock))
    for name, grad in plain.items():
        torch.testing.assert_close(every[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    global_gate_up_bytes = patches.lengths.numel() * 2 * TINY.global_hidden * 4
    assert hidden_kept - every_kept == TINY.global_layers * global_gate_up_bytes
    with pytest.raises(ValueError, match="activation_checkpointing"):
        BLTLM(TINY, activation_checkpointing="attention")


def test_the_models_and_patching_load_without_lightning():
    """The models are plain torch.nn: a script that only runs one, as bench/ does, need not load Lightning."""
    script = ("import sys, blt_lightning.models.blt, blt_lightning.patcher, blt_lightning.patching\n"
              "print(sorted({name.split('.')[0] for name in sys.modules} & {'lightning', 'pytorch_lightning'}))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
