import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from blt_lightning.models.layers import (KVCache, Linear, Rope, TransformerBlock, parts_as_stacked, stacked_as_parts,
                                         window_mask)


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


def test_stacked_projections_split_into_their_parts_and_load_from_them():
    block = TransformerBlock(16, 2, 32, 1e-5)
    parts = stacked_as_parts({f"layers.0.{name}": value for name, value in block.state_dict().items()})
    assert {"layers.0.attention.wq.weight", "layers.0.attention.wk.weight", "layers.0.attention.wv.weight",
            "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w3.weight"} <= parts.keys()
    assert not any("wqkv" in name or "w13" in name for name in parts)
    assert torch.equal(parts["layers.0.attention.wk.weight"], block.attention.wqkv.weight[16:32])
    assert torch.equal(parts["layers.0.feed_forward.w3.weight"], block.feed_forward.w13.weight[32:])
    again = parts_as_stacked(parts)
    assert again.keys() == {f"layers.0.{name}" for name in block.state_dict()}
    assert all(torch.equal(again[f"layers.0.{name}"], w) for name, w in block.state_dict().items())
    other = TransformerBlock(16, 2, 32, 1e-5)  # as a checkpoint of an earlier version, or converted weights, load
    other.load_state_dict({name.removeprefix("layers.0."): value.clone() for name, value in parts.items()})
    assert torch.equal(other.attention.wqkv.weight, block.attention.wqkv.weight)
    assert torch.equal(other.feed_forward.w13.weight, block.feed_forward.w13.weight)
    assert torch.equal(pickle.loads(pickle.dumps(block)).attention.wqkv.weight, block.attention.wqkv.weight)


def test_a_block_fed_one_position_at_a_time_gives_its_pass_over_the_whole_row(monkeypatch):
    torch.manual_seed(0)
    dim, heads, window, length, theta = 32, 4, 5, 12, 10_000.0
    block = TransformerBlock(dim, heads, 64, 1e-5)
    x, positions = torch.randn(1, length, dim), torch.arange(length)
    whole = block(x, window_mask(positions, positions, window), Rope.at(positions, dim // heads, theta))
    monkeypatch.setattr(TransformerBlock, "_forward", None)  # a single position takes _step
    cache, steps = KVCache.empty(1, window), []
    with torch.no_grad():
        for t in range(length):
            at = positions[t : t + 1]
            steps.append(block(x[:, t : t + 1], cache.mask(at), Rope.at(at, dim // heads, theta), cache, 0))
            cache.advance(1)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-6)
