"""Analytic FLOPs per byte, from a model's config (and, for BLT, the mean patch size).

A multiply-add counts 2 FLOPs. Only matrix products count (norms, RoPE, softmax and embedding
lookups are a rounding error). Attention counts the keys each query may see under its mask (causal,
windowed, its own patch), not what a dense kernel computes: that is the model's cost, whatever the
kernel. Document boundaries are ignored (rows are taken as one document), so attention is an upper
bound. Training is 3x the forward pass (backward: twice the forward) of what is trained, plus a
forward pass of the frozen entropy model when it patches on the fly; inference is one forward pass.
Patches are those of the bytes: a batch whose rows have unequal numbers of patches runs its global
transformer over as many slots in every row, and the empty slots are not counted (on entropy patches at
rows of 256, PyTorch's FLOP counter found 12% more than the count), so MFU on such batches reads low.
"""

from .models.blt import BLTConfig
from .models.entropy import EntropyModelConfig
from .vocab import VOCAB_SIZE


def mean_keys(seq_len: int, window: int | None) -> float:
    """Keys a causal query sees on average over a row of seq_len, itself included, within `window`."""
    w = seq_len if window is None else min(window, seq_len)
    # positions t < w see t + 1 keys; the rest see w
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def block_flops(dim: int, hidden: int, keys: float) -> float:
    """Forward FLOPs per position of a transformer block: q, k, v, o projections, SwiGLU, attention."""
    return 2 * (4 * dim * dim + 3 * dim * hidden) + 4 * dim * keys


def cross_attention_flops(dim: int, queries: float, kv: float, keys_per_query: float) -> float:
    """Forward FLOPs of a cross-attention: q and o over `queries`, k and v over `kv` positions."""
    return 2 * 2 * dim * dim * (queries + kv) + 4 * dim * keys_per_query * queries


def entropy_model_flops_per_byte(config: EntropyModelConfig, seq_len: int, attention: bool = True,
                                 window: int | None = None) -> float:
    """Forward FLOPs per byte of the entropy model over rows of seq_len, each position seeing at most
    `window` ids (default: the config's sliding window); without attention scores and their weighted sums
    unless `attention` (what is left are the weight matrices' products)."""
    keys = mean_keys(seq_len, window or config.sliding_window) if attention else 0
    return config.n_layers * block_flops(config.dim, config.ffn_hidden, keys) + 2 * config.dim * VOCAB_SIZE


def blt_flops_per_byte(config: BLTConfig, seq_len: int, mean_patch_size: float, attention: bool = True) -> float:
    """Forward FLOPs per byte of the Byte Latent Transformer, with patches of `mean_patch_size` bytes
    (`attention` as for the entropy model)."""
    c, k = config, config.cross_attn_k
    patches = 1 / mean_patch_size  # per byte
    on = 1 if attention else 0

    local_keys = on * mean_keys(seq_len, c.local_window)
    patch_keys = on * mean_keys(max(1, round(seq_len * patches)), None)

    encoder = c.encoder_layers * block_flops(c.encoder_dim, c.encoder_hidden, local_keys)
    encoder += c.encoder_cross_attns * cross_attention_flops(c.encoder_dim, patches * k, 1, on * mean_patch_size)
    encoder += patches * 2 * c.encoder_dim * c.encoder_dim * k if k > 1 else 0  # pooled patch -> k slots

    width_in = k * c.encoder_dim
    global_ = patches * (c.global_layers * block_flops(c.global_dim, c.global_hidden, patch_keys)
                         + (2 * width_in * c.global_dim if width_in != c.global_dim else 0))

    d = c.decoder_dim
    decoder = c.decoder_layers * block_flops(d, c.decoder_hidden, local_keys)
    decoder += c.decoder_cross_attns * cross_attention_flops(d, 1, patches * k, on * k)
    decoder += patches * 2 * c.global_dim * d * k  # global output -> k slots
    decoder += 2 * c.encoder_dim * d if c.encoder_dim != d else 0
    decoder += 2 * d * VOCAB_SIZE
    return encoder + global_ + decoder
