import pytest
import torch
import torch.nn.functional as F
from conftest import kept_under_recipes

from blt_lightning.models import lean_backward
from blt_lightning.models.attention import (ReadGroupSlots, SlotsReadGroup, attention, attention_rows, build_mask,
                                           causal_documents, windows_save_work)


def qkv(B: int, Lq: int, Lk: int, seed: int, H: int = 2, D: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g, requires_grad=True) for L in (Lq, Lk, Lk)]


def run_both(mask_mod, q, k, v) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs and q, k, v gradients under the sdpa and the dense masks (the same random output gradient)."""
    B, _, Lq, _ = q.shape
    results = []
    for implementation in ("sdpa", "dense"):
        y = attention(q, k, v, build_mask(mask_mod, B, Lq, k.shape[2], q.device, implementation))
        weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
        grads = torch.autograd.grad((y * weights).sum(), (q, k, v))
        results.append([y, *grads])
    return results


@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["cpu_kernel", "composed"])
@pytest.mark.parametrize("block", [3, 256])
@pytest.mark.parametrize("length", [1, 7, 8, 9, 24, 37])
@pytest.mark.parametrize("window", [1, 3, 8, 30, 64, None])
def test_self_attention_in_blocks_equals_the_dense_mask(length, window, block, cpu_kernel, monkeypatch):
    """Blocks run on the CPU as one autograd function over torch's flash kernel (windowed or causal), elsewhere (and
    compiled) as SDPA calls composed through autograd: both, here on the CPU."""
    monkeypatch.setattr("blt_lightning.models.attention.BLOCK", block)
    if not cpu_kernel:
        monkeypatch.setattr("blt_lightning.models.attention._by_the_cpu_kernel", lambda q, mask: False)
    doc_ids = torch.stack([torch.zeros(length, dtype=torch.long), (torch.arange(length) >= length // 3).long()
                           + (torch.arange(length) >= length - 2).long()])  # one document; three, one of 2 ids
    mask_mod = causal_documents(doc_ids, window)
    blocks = build_mask(mask_mod, 2, length, length, torch.device("cpu"), "sdpa")
    assert blocks.windowed == (window is not None and windows_save_work(window, length))
    q, k, v = qkv(2, length, length, seed=length * 100 + (window or 0))
    assert (attention_rows(q, k, v, blocks).grad_fn.name() == "_CPUBlockAttentionBackward") == cpu_kernel
    sdpa, dense = run_both(mask_mod, q, k, v)
    for a, b in zip(sdpa, dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("window", "cpu_kernel"), [(None, False), (None, True), (8, False), (8, True)],
                         ids=["causal_composed", "causal_cpu_kernel", "windowed_composed", "windowed_cpu_kernel"])
def test_blocks_read_by_a_projection_keep_their_inputs_outputs_and_boolean_mask_only(window, cpu_kernel, monkeypatch):
    """Under keeping_recipes (the models' forward), self-attention in blocks whose rows a projection reads keeps
    for backward q, k and v (padded to whole blocks where windowed), SDPA's outputs and log-sum-exps, and the
    boolean mask. The float masks SDPA adds, the copies of the keys each window meets and the heads laid side
    by side for the projection are recipes over those, or (by the CPU kernels) are never made."""
    monkeypatch.setattr("blt_lightning.models.attention.BLOCK", 8)
    if not cpu_kernel:
        monkeypatch.setattr("blt_lightning.models.attention._by_the_cpu_kernel", lambda q, mask: False)
    B, H, L, D = 2, 2, 37, 8
    q, k, v = qkv(B, L, L, seed=0, H=H, D=D)
    blocks = build_mask(causal_documents(torch.zeros(B, L, dtype=torch.long), window), B, L, L,
                        torch.device("cpu"), "sdpa")
    kept = kept_under_recipes(monkeypatch)
    projection = torch.randn(H * D, H * D, requires_grad=True)
    with lean_backward.keeping_recipes():
        rows = attention_rows(q, k, v, blocks)
        y = F.linear(rows, projection)
    kept.pop(projection.untyped_storage().data_ptr())
    floats = sum(n for dtype, n in kept.values() if dtype == torch.float32) // 4
    mask = sum(n for dtype, n in kept.values() if dtype == torch.bool)
    if window is None:  # causal blocks: q, k and v as they are; the CPU kernel holds the mask, not through the hooks
        assert not blocks.windowed and mask == (0 if cpu_kernel else B * L * L)
        assert floats == 3 * B * H * L * D + B * H * L * D + B * H * L
    elif not cpu_kernel:  # 5 blocks of 8, each against its own and 1 block before (a block of zeros before the first)
        assert blocks.windowed and mask == B * 5 * 8 * 16
        assert floats == B * H * 40 * D + 2 * B * H * 48 * D + B * H * 40 * D + B * H * 40
    else:  # the rows end to end: q 2 x 40, keys and values one block of zeros and 2 x 40; the output rows
        assert rows.grad_fn.name() == "_CPUBlockAttentionBackward"
        assert blocks.windowed and mask == 0  # the function holds the model's boolean mask, not through the hooks
        assert floats == B * H * 40 * D + 2 * (8 + B * 40) * H * D + B * H * L * D + B * H * 40
    torch.testing.assert_close(y, F.linear(attention(q, k, v, blocks).transpose(1, 2).reshape(B, L, H * D),
                                           projection))


@pytest.mark.parametrize("window", [9, None], ids=["windowed", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_by_the_cpu_kernels_compute_what_the_composed_calls_do(dtype, window, monkeypatch):
    """Rows with documents, q, k and v strided views of one projection, windowed calls of 3 blocks that span rows
    (the last padded): the same outputs, bitwise, with gradients or without, and gradients to rounding; under
    autocast both compute in its dtype."""
    from blt_lightning.models import attention as attention_module

    monkeypatch.setattr(attention_module, "BLOCK", 4)
    monkeypatch.setattr(attention_module, "WINDOW_CALL_BLOCKS", 3)
    B, H, L, D = 3, 2, 30, 8
    qkv_rows = torch.randn(B, L, 3, H, D, generator=torch.Generator().manual_seed(0), requires_grad=True)
    doc_ids = (torch.arange(L) >= 11).long() + (torch.arange(L) >= 23).long()
    blocks = build_mask(causal_documents(doc_ids.expand(B, L), window), B, L, L, torch.device("cpu"), "sdpa")
    assert blocks.windowed == (window is not None)
    if blocks.windowed:
        assert blocks.allowed.shape[0] == B * 8  # 8 blocks a row: calls of 3 span rows
    weights = torch.randn(B, L, H * D, generator=torch.Generator().manual_seed(1))
    results = []
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(attention_module, "_by_the_cpu_kernel", lambda q, mask: False)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            q, k, v = qkv_rows.unbind(2)
            y = attention_rows(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), blocks)
            with torch.no_grad():
                y_without_grad = attention_rows(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), blocks)
        assert y.dtype == dtype and torch.equal(y, y_without_grad)
        assert ("_CPU" in y.grad_fn.name()) == kernel
        results.append((y, *torch.autograd.grad((y.float() * weights).sum(), qkv_rows)))
    (kernel_y, kernel_grad), (composed_y, composed_grad) = results
    assert torch.equal(kernel_y, composed_y)
    rounding = {"rtol": 0, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}  # bf16's
    torch.testing.assert_close(kernel_grad, composed_grad, **rounding)


def test_slots_read_only_their_group_and_keyless_groups_get_nothing():
    # 3 groups with keys (in the first row 1, 6 and 3 keys), then 2 keyless groups; 3 slots each
    key_group = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 2, 2, 2, 2, 2]])
    keyless = torch.tensor([[False, False, False, True, True]] * 2)
    mask_mod = SlotsReadGroup(key_group, 3, keyless)
    q, k, v = qkv(2, 5 * 3, 10, seed=0)
    real = slice(0, 9)  # the slots of groups with keys: keyless ones read every key in dense, nothing in sdpa
    outputs = []
    for implementation in ("sdpa", "dense"):
        y = attention(q, k, v, build_mask(mask_mod, 2, 15, 10, q.device, implementation))
        outputs.append([y, *torch.autograd.grad(y[:, :, real].square().sum(), (q, k, v))])
    for a, b in zip(*outputs):
        torch.testing.assert_close(a[:, :, real], b[:, :, real], rtol=1e-5, atol=1e-5)
    sdpa = outputs[0][0]
    assert (sdpa[:, :, 9:] == 0).all()
    # a group of one key reads its value
    torch.testing.assert_close(sdpa[0, :, :3], v[0, :, :1].detach().expand(-1, 3, -1))
    # under bf16 autocast, from float32 inputs too (the scores are bf16, q is not)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, dense = (attention(q, k, v, build_mask(mask_mod, 2, 15, 10, q.device, implementation))
                    for implementation in ("sdpa", "dense"))
    torch.testing.assert_close(y[:, :, real].float(), dense[:, :, real].float(), rtol=2e-2, atol=2e-2)


def test_queries_read_only_their_groups_slots():
    query_group = torch.tensor([[0, 0, 1, 1, 1, 2, 3, 3], [-1, -1, 0, 0, 0, 0, 1, 1]])  # -1: no group to read
    sdpa, dense = run_both(ReadGroupSlots(query_group, 2), *qkv(2, 8, 4 * 2, seed=1))
    for a, b in zip(sdpa, dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (sdpa[0][1, :, :2] == 0).all()


@pytest.mark.parametrize("window", [4, None], ids=["windowed", "causal"])
def test_blocks_by_the_cpu_kernels_read_inputs_whose_rows_are_strided(window, monkeypatch):
    """q, k and v whose D values of a position are not adjacent in memory (here a transpose of a transpose): the
    kernels' op, called directly, would read them as if they were."""
    monkeypatch.setattr("blt_lightning.models.attention.BLOCK", 4)
    B, L = 2, 24
    mask_mod = causal_documents((torch.arange(L) >= 10).long().expand(B, L), window)
    blocks = build_mask(mask_mod, B, L, L, torch.device("cpu"), "sdpa")
    assert blocks.windowed == (window is not None)
    dense = build_mask(mask_mod, B, L, L, torch.device("cpu"), "dense")
    q, k, v = qkv(B, L, L, seed=3)
    strided = [x.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_() for x in (q, k, v)]
    assert all(x.stride(-1) != 1 for x in strided)
    y = attention_rows(*strided, blocks)
    assert "_CPU" in y.grad_fn.name()
    torch.testing.assert_close(y, attention(q, k, v, dense).transpose(1, 2).reshape(B, L, -1), rtol=1e-5, atol=1e-6)
