import pytest
import torch

from blt_lightning.models.attention import ReadGroupSlots, SlotsReadGroup, WindowBlocks, attention, build_mask, causal_documents


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


@pytest.mark.parametrize("length", [1, 7, 8, 9, 24, 37])
@pytest.mark.parametrize("window", [1, 3, 8, 30, 64])
def test_a_window_computed_in_blocks_equals_the_dense_window(length, window):
    doc_ids = torch.stack([torch.zeros(length, dtype=torch.long), (torch.arange(length) >= length // 3).long()
                           + (torch.arange(length) >= length - 2).long()])  # one document; three, one of 2 ids
    mask_mod = causal_documents(doc_ids, window)
    blocked = build_mask(mask_mod, 2, length, length, torch.device("cpu"), "sdpa")
    assert isinstance(blocked, WindowBlocks) == (window < length)
    sdpa, dense = run_both(mask_mod, *qkv(2, length, length, seed=length * 100 + window))
    for a, b in zip(sdpa, dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_slots_read_only_their_group_and_keyless_groups_get_nothing():
    # 3 real groups over 10 keys (lengths 1, 6, 3), then 2 keyless groups; 3 slots each
    key_group = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 2, 2, 2, 2, 2]])
    keyless = torch.tensor([[False, False, False, True, True], [False, False, False, True, True]])
    mask_mod = SlotsReadGroup(key_group, 3, keyless)
    q, k, v = qkv(2, 5 * 3, 10, seed=0)
    sdpa, dense = run_both(mask_mod, q, k, v)
    real = slice(0, 9)  # the slots of the groups that have keys
    torch.testing.assert_close(sdpa[0][:, :, real], dense[0][:, :, real], rtol=1e-5, atol=1e-6)
    assert (sdpa[0][:, :, 9:] == 0).all()
    torch.testing.assert_close(sdpa[0][:, :, 0], v[:, :, 0].detach())  # a group of one key returns its value
    # gradients: keys and values agree when only the real slots' outputs matter
    sdpa, dense = [[torch.autograd.grad(attention(q, k, v, m)[:, :, real].square().sum(), (q, k, v))]
                   for m in (build_mask(mask_mod, 2, 15, 10, q.device, i) for i in ("sdpa", "dense"))]
    for a, b in zip(sdpa[0], dense[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_queries_read_only_their_groups_slots():
    query_group = torch.tensor([[0, 0, 1, 1, 1, 2, 3, 3], [-1, -1, 0, 0, 0, 0, 1, 1]])  # -1: no group to read
    sdpa, dense = run_both(ReadGroupSlots(query_group, 2), *qkv(2, 8, 4 * 2, seed=1))
    for a, b in zip(sdpa, dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (sdpa[0][1, :, :2] == 0).all()
