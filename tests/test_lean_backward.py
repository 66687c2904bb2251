import pytest
import torch
import torch.nn.functional as F
from conftest import kept_for_backward

from blt_lightning.models.layers import FeedForward
from blt_lightning.models.lean_backward import RMSNorm, swiglu_down


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

    assert kept_for_backward(composite)[1] > params + activations + 2 * 4 * 64 * 96 * 4  # silu(gate) and the product too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_under_bfloat16_autocast_the_gradients_are_those_of_autocasts_composite(dtype):
    torch.manual_seed(0)
    ffn, norm = FeedForward(32, 64), RMSNorm(32, eps=1e-6)
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
