import math

import pytest
import torch
import torch.nn.functional as F

from blt_lightning.models.layers import Linear, Rope


@pytest.mark.parametrize("shape", [(48,), (1, 48), (1, 1, 48)])
def test_a_single_row_on_the_cpu_is_multiplied_in_halves_as_the_matrix_product_would(shape, monkeypatch):
    layer = Linear(48, 20)
    x = torch.randn(shape)
    batched = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *args: batched.append(args) or bmm(*args))
    y = layer(x)
    assert len(batched) == 1 and y.shape == (*shape[:-1], 20)
    torch.testing.assert_close(y, F.linear(x, layer.weight), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x, outputs", [(torch.randn(3, 48), 20), (torch.randn(48, 2).t()[:1], 20),
                                        (torch.randn(1, 48), 21)], ids=["rows", "a strided row", "odd outputs"])
def test_anything_else_is_the_plain_matrix_product(x, outputs, monkeypatch):
    layer = Linear(48, outputs)
    monkeypatch.setattr(torch, "bmm", None)  # never called
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_rope_turns_each_pair_by_its_angle():
    head_dim, theta = 8, 10_000.0
    positions = torch.tensor([0, 3, 1_000_003])
    x = torch.randn(1, 2, 3, head_dim, dtype=torch.float64)
    rope = Rope.at(positions, head_dim, theta)
    got = rope.rotate(x.float())
    half = head_dim // 2
    for p, position in enumerate(positions.tolist()):
        for i in range(half):
            angle = position * theta ** (-2 * i / head_dim)
            a, b = x[..., p, i], x[..., p, i + half]
            torch.testing.assert_close(got[..., p, i], (a * math.cos(angle) - b * math.sin(angle)).float())
            torch.testing.assert_close(got[..., p, i + half], (b * math.cos(angle) + a * math.sin(angle)).float())
    assert rope.rotate(x.bfloat16()).dtype == torch.bfloat16
