import math

import pytest
import torch

from blt_lightning.models import EntropyModel, EntropyModelConfig
from blt_lightning.vocab import VOCAB_SIZE, encode

TINY = EntropyModelConfig(dim=32, n_layers=2, n_heads=4, sliding_window=None)


def model(config=TINY, seed=0):
    torch.manual_seed(seed)
    return EntropyModel(config).eval()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_later_byte_never_changes_earlier_outputs(seed):
    m = model(seed=seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB_SIZE, (2, 40), generator=g)
    ref = m(ids)
    for t in (0, 7, 38):
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(4, VOCAB_SIZE, changed[:, t + 1 :].shape, generator=g)
        out = m(changed)
        torch.testing.assert_close(out[:, : t + 1], ref[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(out[:, t + 1 :], ref[:, t + 1 :])


def test_attention_does_not_cross_documents():
    m = model()
    second = encode(b"the second document")
    row_a = torch.cat([encode(b"one first document"), second])[None]
    row_b = torch.cat([encode(b"a different and longer first one"), second])[None]
    # The second document's outputs are the same whatever came before it in the row (RoPE is relative).
    torch.testing.assert_close(m(row_a)[0, -len(second) :], m(row_b)[0, -len(second) :], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m(row_a)[0, -len(second) :], m(second[None])[0], rtol=1e-4, atol=1e-4)


def test_sliding_window_limits_what_a_position_sees():
    m = model(EntropyModelConfig(dim=32, n_layers=1, n_heads=4, sliding_window=4))
    ids = torch.randint(4, VOCAB_SIZE, (1, 20))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1 - 4) % 256 + 4
    diff = (m(ids) - m(changed)).abs().amax(-1)[0]
    assert diff[:5].max() == 0 and diff[5:9].min() > 0 and diff[9:].max() == 0  # one layer sees 4 keys


def test_entropies_are_the_next_byte_distributions_entropy():
    m = model()
    with torch.no_grad():
        m.output.weight.mul_(30.0)  # sharper distributions than at initialisation: entropies spread out
    ids = torch.randint(4, VOCAB_SIZE, (3, 30))
    h = m.entropies(ids)
    assert h.shape == (3, 30) and h.dtype == torch.float32
    expected = torch.distributions.Categorical(logits=m(ids)).entropy()
    torch.testing.assert_close(h, expected, rtol=1e-4, atol=1e-5)
    assert h.min() < 0.5 * h.max(), "the check above needs entropies that differ"
    assert (h >= 0).all() and (h <= math.log(VOCAB_SIZE)).all()
    uniform = model()
    with torch.no_grad():
        uniform.output.weight.zero_()
    torch.testing.assert_close(uniform.entropies(ids), torch.full((3, 30), math.log(VOCAB_SIZE)), rtol=1e-5, atol=1e-5)


def test_reference_shape_and_sizes():
    config = EntropyModelConfig()
    assert (config.dim, config.n_layers, config.n_heads, config.sliding_window,
            config.ffn_hidden) == (768, 14, 12, 512, 2048)


def test_a_stream_through_the_cache_gives_the_windowed_pass_in_bounded_memory():
    m = model(EntropyModelConfig(dim=32, n_layers=2, n_heads=4, sliding_window=8))
    ids = torch.randint(4, VOCAB_SIZE, (2, 60))
    expected = m(ids)  # one pass, window 8
    cache = m.new_cache()
    chunks, out, start = [5, 1, 1, 9, 1, 20, 1, 1, 1, 1, 19], [], 0
    with torch.no_grad():
        for size in chunks:
            out.append(m.forward_cached(ids[:, start : start + size], cache))
            start += size
            # Keys are written in place after the kept ones: the buffers never hold more than twice the
            # window and the largest chunk, however long the stream.
            assert all(k.shape[2] <= 2 * (8 + max(chunks)) for k in cache.keys)
            # A query sees 7 keys besides itself: each layer keeps the latest 7.
            assert all(end - begin == min(start, 7) for begin, end in cache.spans) and cache.length == start
    torch.testing.assert_close(torch.cat(out, dim=1), expected, rtol=1e-4, atol=1e-5)
