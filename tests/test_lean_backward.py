import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import kept_for_backward, kept_under_recipes

from blt_lightning.models.layers import FeedForward, set_activation_checkpointing
from blt_lightning.models.lean_backward import RMSNorm, swiglu_down, swiglu_recomputed


def composite_swiglu_down(gate_up, w2):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def test_the_norm_computes_torchs_rms_norm_bitwise():
    norm = RMSNorm(48, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    for x in (torch.randn(2, 7, 48), torch.randn(2, 7, 48).bfloat16()):
        x.requires_grad_()
        expected = F.rms_norm(x.detach(), (48,), norm.weight.detach(), 1e-5)
        got = norm(x)
        assert got.grad_fn is not None and got.dtype == expected.dtype
        assert torch.equal(got, expected)


def test_gradients_are_those_of_the_composite_operations():
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, dtype=torch.float64, requires_grad=True)
    norm = RMSNorm(16, eps=1e-6).double()
    norm.weight.data.copy_(weight.detach())
    assert torch.autograd.gradcheck(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), (x, weight))
    gate_up = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu_down, (gate_up, w2))
    # and in float32, against autograd's own formulas
    gate_up32, w2_32 = (t.detach().float().requires_grad_() for t in (gate_up, w2))
    ours = torch.autograd.grad(swiglu_down(gate_up32, w2_32).square().sum(), (gate_up32, w2_32))
    theirs = torch.autograd.grad(composite_swiglu_down(gate_up32, w2_32).square().sum(), (gate_up32, w2_32))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_backward_keeps_the_input_and_the_stacked_product_only():
    ffn, norm = FeedForward(32, 96), RMSNorm(32)
    x = torch.randn(4, 64, 32, requires_grad=True)
    params = sum(p.untyped_storage().nbytes() for p in (*ffn.parameters(), norm.weight))
    activations = x.numel() * 4 + 4 * 64 * 4  # the norm's input and 1 / rms
    activations += x.numel() * 4 + 4 * 64 * 2 * 96 * 4  # w13's input and its product [gate, up]
    assert kept_for_backward(lambda: ffn(norm(x)))[1] == params + activations

    def composite():
        gate, up = ffn.w13(F.rms_norm(x, (32,), norm.weight)).chunk(2, dim=-1)
        return ffn.w2(F.silu(gate) * up)

    assert kept_for_backward(composite)[1] > params + activations + 2 * 4 * 64 * 96 * 4  # silu(gate), the product


@pytest.mark.parametrize("recompute_hidden", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_under_bfloat16_autocast_the_gradients_are_those_of_autocasts_composite(dtype, recompute_hidden):
    torch.manual_seed(0)
    ffn, norm = FeedForward(32, 64), RMSNorm(32, eps=1e-6)
    ffn.recompute_hidden = recompute_hidden
    x = torch.randn(2, 16, 32, dtype=dtype, requires_grad=True)

    def grads(forward):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = forward(x)
        assert y.dtype == torch.bfloat16
        x.grad = None
        ffn.zero_grad(), norm.zero_grad()
        y.float().square().sum().backward()
        return [x.grad, *(p.grad for p in (*ffn.parameters(), norm.weight))]

    def composite(x):
        gate, up = ffn.w13(F.rms_norm(x, (32,), norm.weight, 1e-6)).chunk(2, dim=-1)
        return ffn.w2(F.silu(gate) * up)

    ours, theirs = grads(lambda x: ffn(norm(x))), grads(composite)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


def test_frozen_weights_one_dimensional_inputs_and_torchs_default_eps():
    x = (torch.randn(8) * 1e-3).bfloat16().requires_grad_()
    norm = RMSNorm(8).requires_grad_(False)  # eps None: float32's, as torch takes for bfloat16
    gate_up = torch.randn(12, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(norm(x), F.rms_norm(x.detach(), (8,), norm.weight))
    norm(x).float().sum().backward()
    assert x.grad is not None and norm.weight.grad is None
    assert torch.autograd.gradcheck(swiglu_down, (gate_up, w2))
    x, w13 = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True), torch.randn(12, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(swiglu_recomputed, (x, w13, w2))


def test_second_derivatives_raise_rather_than_being_wrong():
    x = torch.randn(3, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(RMSNorm(8)(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_without_gradients_the_modules_take_torchs_own_paths(monkeypatch):
    from blt_lightning.models import layers, lean_backward

    ffn, norm, x = FeedForward(16, 32), RMSNorm(16), torch.randn(3, 16)
    monkeypatch.setattr(layers, "swiglu_down", None)
    monkeypatch.setattr(lean_backward._RMSNorm, "apply", None)
    with torch.no_grad():
        ffn(x), norm(x)
    for module in (ffn, norm):
        with pytest.raises(TypeError):  # None is not callable: with gradients, each takes its own function
            module(x)


def test_a_recomputed_hidden_keeps_the_input_only_and_gives_the_same_results():
    torch.manual_seed(0)
    ffn = FeedForward(32, 48)
    x = torch.randn(4, 16, 32, requires_grad=True)
    float64 = [t.detach().double().requires_grad_() for t in (x, ffn.w13.weight, ffn.w2.weight)]
    assert torch.autograd.gradcheck(swiglu_recomputed, float64)

    def run(recompute_hidden: bool):
        ffn.recompute_hidden, x.grad = recompute_hidden, None
        ffn.zero_grad()
        y, kept = kept_for_backward(lambda: ffn(x))
        y.square().sum().backward()
        return y, [x.grad, ffn.w13.weight.grad, ffn.w2.weight.grad], kept

    (y, grads, kept), (y_recomputed, grads_recomputed, kept_recomputed) = run(False), run(True)
    assert torch.equal(y_recomputed, y)
    for a, b in zip(grads_recomputed, grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    params = sum(p.untyped_storage().nbytes() for p in ffn.parameters())
    assert kept_recomputed == params + x.untyped_storage().nbytes()
    assert kept == kept_recomputed + 4 * 16 * 2 * 48 * 4  # and [gate, up]


def test_a_recomputed_hidden_is_remade_a_chunk_of_rows_at_a_time_with_the_same_gradients(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    from blt_lightning.models import lean_backward

    torch.manual_seed(0)
    x, w13, w2 = torch.randn(2, 13, 8, requires_grad=True), torch.randn(24, 8), torch.randn(8, 12)
    w13.requires_grad_(), w2.requires_grad_()

    class LargestResult(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args, kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.numel = max([self.numel] + [t.numel() for t in torch.utils._pytree.tree_leaves(out)
                                            if isinstance(t, torch.Tensor)])
            return out

    def gradients(chunk_elements: int):
        monkeypatch.setattr(lean_backward, "RECOMPUTE_CHUNK_ELEMENTS", chunk_elements)
        y = swiglu_recomputed(x, w13, w2)
        with LargestResult() as largest:
            grads = torch.autograd.grad(y.square().sum(), (x, w13, w2))
        return grads, largest.numel

    whole, whole_largest = gradients(1 << 22)
    chunked, chunked_largest = gradients(10 * 24)  # 26 rows in chunks of 9, 9 and 8
    assert whole_largest == 26 * 24 and chunked_largest == 9 * 24  # the hidden of all rows, then of 9
    for a, b in zip(chunked, whole):  # the weights' gradients summed in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    float64 = [t.detach().double().requires_grad_() for t in (x, w13, w2)]
    assert torch.autograd.gradcheck(swiglu_recomputed, float64)


@pytest.mark.parametrize("recompute_hidden", [False, True])
def test_recipes_keep_less_and_leave_every_gradient_bitwise_the_same(monkeypatch, recompute_hidden):
    """Under the models' keeping_recipes(), the norms' outputs, the window blocks' copies of keys and the
    cross-attentions' gathered keys are kept as recipes: backward makes them again."""
    from test_blt_model import TINY, patcher_for, rows

    from blt_lightning.models.blt import ByteLatentTransformer
    from blt_lightning.patching import PatchingConfig

    ids = rows(0)
    patches = patcher_for(PatchingConfig(mode="static", patch_size=3))(ids[:, :-1])
    torch.manual_seed(0)
    model = ByteLatentTransformer(TINY)
    set_activation_checkpointing(model, "byte_feed_forward" if recompute_hidden else False)

    def gradients():
        model.zero_grad(set_to_none=True)
        logits = model(ids[:, :-1], patches)
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    kept = kept_under_recipes(monkeypatch)
    with_recipes = gradients()
    # An outer saved-tensor hook (here a count) turns recipes off: it sees all that is saved inside.
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    without_recipes, kept_without = kept_for_backward(gradients, excluding=weights)
    kept_with = sum(n for address, (_, n) in kept.items() if address not in weights)
    assert 0 < kept_with < 0.75 * kept_without  # 0.71 here (0.65 recomputing the hidden)
    for name, grad in without_recipes.items():
        assert torch.equal(with_recipes[name], grad), name


def test_inside_keeping_recipes_changes_in_place_are_caught_as_autograd_catches_them():
    from blt_lightning.models.lean_backward import keeping_recipes, remade_in_backward

    def doubled(x):
        return x * 2

    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    # a saved tensor changed in place before backward: an error, as without hooks
    with keeping_recipes():
        b = torch.randn(4, 3)
        y = (x * b).sum()
    b.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    # a marked tensor changed in place before an operation saves it: kept itself, so w's gradient is right
    with keeping_recipes():
        h = remade_in_backward(doubled(x), functools.partial(doubled, x.detach()))
        (h.mul_(3) @ w).sum().backward()
    torch.testing.assert_close(w.grad, (6 * x).detach().sum(0)[:, None].expand(3, 2))
    # a tensor a recipe reads changed in place after the save: an error
    source = torch.randn(4, 3)
    with keeping_recipes():
        y = (remade_in_backward(doubled(source), functools.partial(doubled, source)) @ w).sum()
    source.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    # sparse and meta tensors are kept as they are
    with keeping_recipes():
        torch.sparse.mm(torch.eye(3).to_sparse(), w).sum().backward()
        torch.randn(2, 3, device="meta", requires_grad=True).square()
