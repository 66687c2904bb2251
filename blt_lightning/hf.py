"""The Hugging Face transformers BLT format (BltConfig, BltForCausalLM, BltPatcher) against ours: how configs
and parameters correspond, both ways. `import-hf` (hf_import.py) and `export-hf` (hf_export.py) build on it.
transformers is the `hf` extra: it is imported when a config is read or written, never with this module.

Where the two compute differently, and what is done about it:
- RoPE: transformers (like the reference code) rotates interleaved pairs (x[2i], x[2i+1]); we rotate halves
  (x[i], x[i + D/2]). Permuting the rows of every self-attention wq and wk, head by head, gives the same scores.
- The cross-attention residual: transformers adds its input twice (2x + attn): doubled_cross_attn_residual.
- Hash n-grams: one fused table there, function-major then n-gram size, V rows each; one table each here, in
  the same order. The same hash; transformers knows 11 primes, we the first 2: at most 2 hash functions.
- Widths and constants transformers keeps per part must agree where ours has one: RoPE theta and norm eps of
  the encoder, global model and decoder; encoder and decoder widths (its decoder reads the encoder's states
  without a projection); cross_attn_k everywhere. No grouped-query attention, SiLU only, untied output head.
- cross_attn_k = 1: transformers keeps a patch projection there that ours leaves out. An encoder with
  cross-attention after every layer: transformers pools the bytes afresh at each layer, ours (as the reference)
  once. Neither is representable; both are refused.
- Patching: with patch_in_forward, BltForCausalLM patches with its patcher exactly as our entropy mode does
  (bytes 0 and 1 start patches, byte t >= 2 when H(t-1) > patching_threshold, then max_patch_length cuts;
  entropies in nats of the same softmax). It knows no documents: a row is one document there, while ours
  split attention, patches and hash n-grams at BOS (and a row's last EOS reads its own patch). Without
  patch_in_forward it makes 1-byte patches unless given patch_lengths; its static, space and byte modes are
  names only, mapped to ours.
  monotonic and combined have no BltConfig form.
- A row's last position: its decoder reads the patch before the one holding the next byte, which lies past
  the row. Ours asks the patching rules whether a byte there would begin a patch (Patches.next_starts), as
  generation does before it draws that byte. BltForCausalLM reads the patch ids of lengths[1:], so its last
  position reads the previous patch when the row's patches fill it, and a padding patch when the batch pads
  the row's patch lengths with zeros: it depends on the batch. Given patch lengths with one empty patch
  appended, it reads its own. Only that position of a row can differ.
- Windows (transformers >= 5.23): local_attention_window_len is our local_window, the patcher's
  sliding_window what our patcher sees (entropy_window: the entropy model's window or the row length it
  was trained on, whichever is shorter); a window is the keys a query sees, itself included, in both.
- Vocabulary: 260 ids, bytes shifted by 4, BOS 1, EOS 2, in both (checked where the config names them).
- Dropout (training only) has no counterpart here and is ignored.
"""

import torch

from .models import EntropyModelConfig
from .models.blt import HASH_PRIMES, BLTConfig
from .models.layers import stacked_as_parts, swiglu_hidden
from .patcher import entropy_window
from .patching import PatchingConfig
from .vocab import BOS, EOS, PAD, VOCAB_SIZE

# Parameter names within a transformer block and a cross-attention: ours -> theirs.
BLOCK = {"attention_norm": "input_layernorm", "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
         "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
         "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj"}
CROSS_ATTENTION = {"query_norm": "q_norm", "kv_norm": "k_norm",
                   "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
ROTATED = ("attention.wq", "attention.wk")
HASH_TABLE = "model.encoder_hash_tok_embedding.weight"
PATCHER = "model.patcher."  # BltForCausalLM's prefix of its patcher's tensors
EXPORTED_MODES = ("entropy", "static", "space", "byte")

# Our parameter name -> (its name there, heads of its rows that RoPE rotates, or None where it does not rotate).
Names = dict[str, tuple[str, int | None]]


def transformers_module():
    """transformers, 5.23 or later: the first whose BltForCausalLM and BltPatcher attend within the windows the
    released checkpoints were trained with (earlier ones, from 4.57, attend to everything before)."""
    try:
        import transformers
    except ImportError:
        raise ImportError("the Hugging Face format needs transformers: pip install 'blt-lightning[hf]'") from None
    if tuple(int(part) for part in transformers.__version__.split(".")[:2]) < (5, 23):
        raise ImportError(f"transformers {transformers.__version__} lacks the local and patcher attention windows "
                          "of the released BLT checkpoints: pip install 'transformers>=5.23'")
    return transformers


def require(ok: bool, where: str, field: str, value, why: str) -> None:
    """Refuse what cannot be represented, naming the file and the field."""
    if not ok:
        raise ValueError(f"{where}: {field} = {value!r}: {why}")


# -- parameters ------------------------------------------------------------------------------------

def _blocks(ours: str, theirs: str, n_layers: int, heads: int) -> Names:
    return {f"{ours}.{i}.{a}.weight": (f"{theirs}.{i}.{b}.weight", heads if a in ROTATED else None)
            for i in range(n_layers) for a, b in BLOCK.items()}


def _cross_attention(ours: str, theirs: str, n_layers: int) -> Names:
    return {f"{ours}.{i}.{a}.weight": (f"{theirs}.{i}.{b}.weight", None)
            for i in range(n_layers) for a, b in CROSS_ATTENTION.items()}


def blt_names(c: BLTConfig) -> Names:
    """Every parameter of ByteLatentTransformer(c) but the hash n-gram tables (HASH_TABLE there)."""
    plain = {"encoder.tok_embeddings": "model.local_encoder.embed_tokens",
             "encoder.patch_projection": "model.local_encoder.patch_embedding_projection",
             "decoder.patch_projection": "model.local_decoder.patch_embedding_projection",
             "decoder.norm": "model.local_decoder.norm", "decoder.output": "lm_head"}
    if c.cross_attn_k * c.encoder_dim != c.global_dim:
        plain["global_transformer.input_projection"] = "model.global_transformer.token_embedding_projection"
    names = {f"{ours}.weight": (f"{theirs}.weight", None) for ours, theirs in plain.items()}
    names |= _blocks("encoder.layers", "model.local_encoder.layers", c.encoder_layers, c.encoder_heads)
    names |= _blocks("global_transformer.layers", "model.global_transformer.layers", c.global_layers, c.global_heads)
    names |= _blocks("decoder.layers", "model.local_decoder.layers", c.decoder_layers, c.decoder_heads)
    names |= _cross_attention("encoder.cross_attn", "model.local_encoder.cross_attn_layers", c.encoder_cross_attns)
    return names | _cross_attention("decoder.cross_attn", "model.local_decoder.cross_attn_layers", c.decoder_cross_attns)


def entropy_names(c: EntropyModelConfig, prefix: str) -> Names:
    """Every parameter of EntropyModel(c), named as BltPatcher's under `prefix` (PATCHER inside BltForCausalLM)."""
    plain = {"tok_embeddings": "embed_tokens", "norm": "norm", "output": "lm_head"}
    names = {f"{ours}.weight": (f"{prefix}{theirs}.weight", None) for ours, theirs in plain.items()}
    return names | _blocks("layers", f"{prefix}layers", c.n_layers, c.n_heads)


def halves_to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a wq or wk [heads * D, dim] for interleaved RoPE, from ours: in each head, row i goes to 2i and
    row i + D/2 to 2i + 1."""
    return w.reshape(heads, 2, -1, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def pairs_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of halves_to_pairs."""
    return w.reshape(heads, -1, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def to_hf(state: dict[str, torch.Tensor], names: Names) -> dict[str, torch.Tensor]:
    """Our state dict under their names: stacked weights as their parts, wq and wk rows permuted. The parts
    are copied (safetensors refuses tensors that share memory)."""
    state = stacked_as_parts(state)
    return {theirs: (halves_to_pairs(state[ours], heads) if heads else
                     state[ours].clone() if state[ours]._is_view() else state[ours].contiguous())
            for ours, (theirs, heads) in names.items()}


def from_hf(weights: dict[str, torch.Tensor], names: Names, where: str) -> dict[str, torch.Tensor]:
    """Their tensors under our names (blocks' parts separate: parts_as_stacked stacks them), wq and wk rows
    permuted back."""
    missing = [theirs for theirs, _ in names.values() if theirs not in weights]
    require(not missing, where, "tensors", missing[:3], f"{len(missing)} expected tensors are missing")
    return {ours: pairs_to_halves(weights[theirs], heads) if heads else weights[theirs]
            for ours, (theirs, heads) in names.items()}


def blt_hf_names(c: BLTConfig) -> set[str]:
    """The tensors of BltForCausalLM that ByteLatentTransformer(c) holds (all but the patcher's)."""
    return {theirs for theirs, _ in blt_names(c).values()} | {HASH_TABLE}


def blt_to_hf(state: dict[str, torch.Tensor], c: BLTConfig) -> dict[str, torch.Tensor]:
    """ByteLatentTransformer(c)'s state dict as BltForCausalLM's (without its patcher)."""
    n_tables = c.hash_functions * len(c.ngram_sizes)
    tables = [state[f"encoder.ngram_embeddings.embeddings.{i}.weight"] for i in range(n_tables)]
    return to_hf(state, blt_names(c)) | {HASH_TABLE: torch.cat(tables)}


def blt_from_hf(weights: dict[str, torch.Tensor], c: BLTConfig, where: str) -> dict[str, torch.Tensor]:
    """ByteLatentTransformer(c)'s state dict from BltForCausalLM's tensors."""
    require(HASH_TABLE in weights, where, "tensors", HASH_TABLE, "the hash n-gram table is missing")
    tables = weights[HASH_TABLE].split(c.ngram_table_size)
    return from_hf(weights, blt_names(c), where) | {
        f"encoder.ngram_embeddings.embeddings.{i}.weight": table.clone() for i, table in enumerate(tables)}


# -- configs: theirs -> ours -----------------------------------------------------------------------

def _rope_theta(part, field: str, where: str) -> float:
    rope = part.rope_parameters or {}
    require(rope.get("rope_type", "default") == "default", where, f"{field}.rope_parameters.rope_type",
            rope.get("rope_type"), "only plain RoPE is implemented here")
    return float(rope["rope_theta"])


def _check_attention(part, field: str, where: str) -> None:
    require(part.num_key_value_heads in (None, part.num_attention_heads), where, f"{field}.num_key_value_heads",
            part.num_key_value_heads, "grouped-query attention is not implemented here")
    require(getattr(part, "hidden_act", "silu") == "silu", where, f"{field}.hidden_act", part.hidden_act,
            "the feed-forward blocks here are SwiGLU")
    heads = part.num_attention_heads
    require(part.hidden_size % heads == 0 and part.hidden_size // heads % 2 == 0, where, f"{field}.num_attention_heads",
            heads, "heads must split hidden_size into even widths (RoPE turns pairs)")


def ffn_multiple_of(dim: int, hidden: int, where: str, field: str) -> int:
    """An ffn_multiple_of for which swiglu_hidden(dim, it) is `hidden` (EntropyModelConfig has no width field)."""
    for multiple in (256, 128, 64, 32, 16, 8, 4, 2, 1, hidden):
        if swiglu_hidden(dim, multiple) == hidden:
            return multiple
    raise ValueError(f"{where}: {field} = {hidden}: narrower than 8/3 of the width {dim}, which the entropy "
                     "model here cannot express")


def blt_config_from_hf(hf, where: str) -> BLTConfig:
    """Our BLTConfig of a BltConfig; `where` (its config.json) names the file in errors."""
    parts = {"encoder_config": hf.encoder_config, "global_config": hf.global_config,
             "decoder_config": hf.decoder_config}
    for field, part in parts.items():
        _check_attention(part, field, where)
    enc, glob, dec = parts.values()
    for field, value in (("vocab_size", hf.vocab_size), ("encoder_config.vocab_size", enc.vocab_size),
                         ("decoder_config.vocab_size", dec.vocab_size)):
        require(value == VOCAB_SIZE, where, field, value, f"the byte vocabulary here has {VOCAB_SIZE} ids")
    for field, value, ours in (("bos_token_id", hf.bos_token_id, BOS), ("eos_token_id", hf.eos_token_id, EOS)):
        require(value in (None, ours), where, field, value, f"the vocabulary here has {field[:3].upper()} = {ours}")
    require(not hf.tie_word_embeddings, where, "tie_word_embeddings", True, "the output head here is its own matrix")
    k = hf.cross_attn_k
    require(k >= 2, where, "cross_attn_k", k, "BltForCausalLM keeps a patch projection at k = 1 that ours has not")
    for field, part in (("encoder_config", enc), ("decoder_config", dec)):
        require(part.cross_attn_k == k, where, f"{field}.cross_attn_k", part.cross_attn_k,
                f"differs from cross_attn_k = {k}")
        require(part.hidden_size_global == glob.hidden_size, where, f"{field}.hidden_size_global",
                part.hidden_size_global, f"differs from global_config.hidden_size = {glob.hidden_size}")
    require(enc.hidden_size == dec.hidden_size, where, "decoder_config.hidden_size", dec.hidden_size,
            f"differs from encoder_config.hidden_size = {enc.hidden_size}: the decoder reads the encoder's states")
    require(not (enc.cross_attn_all_layers and enc.num_hidden_layers > 1), where,
            "encoder_config.cross_attn_all_layers", True,
            "with several encoder layers BltForCausalLM pools the bytes afresh at each, ours once")
    thetas = {field: _rope_theta(part, field, where) for field, part in parts.items()}
    epsilons = {field: part.rms_norm_eps for field, part in parts.items()}
    for field in parts:
        require(thetas[field] == thetas["encoder_config"], where, f"{field}.rope_parameters.rope_theta", thetas[field],
                "one RoPE theta serves the encoder, global model and decoder here")
        require(epsilons[field] == epsilons["encoder_config"], where, f"{field}.rms_norm_eps", epsilons[field],
                "one norm epsilon serves the encoder, global model and decoder here")
    functions = hf.encoder_hash_byte_group_nb_functions
    require(1 <= functions <= len(HASH_PRIMES), where, "encoder_hash_byte_group_nb_functions", functions,
            f"1 to {len(HASH_PRIMES)} hash functions are implemented here")
    return BLTConfig(
        encoder_dim=enc.hidden_size, encoder_layers=enc.num_hidden_layers, encoder_heads=enc.num_attention_heads,
        global_dim=glob.hidden_size, global_layers=glob.num_hidden_layers, global_heads=glob.num_attention_heads,
        decoder_dim=dec.hidden_size, decoder_layers=dec.num_hidden_layers, decoder_heads=dec.num_attention_heads,
        local_window=hf.local_attention_window_len, cross_attn_k=k,
        encoder_cross_attn_all_layers=enc.cross_attn_all_layers,
        decoder_cross_attn_all_layers=dec.cross_attn_all_layers,
        ngram_sizes=tuple(hf.encoder_hash_byte_group_size), ngram_table_size=hf.encoder_hash_byte_group_vocab,
        hash_functions=functions, rope_theta=thetas["encoder_config"], norm_eps=epsilons["encoder_config"],
        encoder_ffn_hidden=enc.intermediate_size, global_ffn_hidden=glob.intermediate_size,
        decoder_ffn_hidden=dec.intermediate_size, doubled_cross_attn_residual=True)


def entropy_config_from_hf(patcher, where: str, field: str = "patcher_config") -> tuple[EntropyModelConfig, int]:
    """Our entropy model config of a BltPatcherConfig, and its context (max_position_embeddings): where a
    patcher without a sliding window sees everything, ours sees that many earlier bytes."""
    _check_attention(patcher, field, where)
    require(patcher.vocab_size == VOCAB_SIZE, where, f"{field}.vocab_size", patcher.vocab_size,
            f"the byte vocabulary here has {VOCAB_SIZE} ids")
    multiple = ffn_multiple_of(patcher.hidden_size, patcher.intermediate_size, where, f"{field}.intermediate_size")
    config = EntropyModelConfig(
        dim=patcher.hidden_size, n_layers=patcher.num_hidden_layers, n_heads=patcher.num_attention_heads,
        sliding_window=patcher.sliding_window, rope_theta=_rope_theta(patcher, field, where),
        norm_eps=patcher.rms_norm_eps, ffn_multiple_of=multiple)
    return config, patcher.max_position_embeddings


def patching_from_hf(hf, where: str, has_entropy_model: bool) -> PatchingConfig:
    """Our PatchingConfig of a BltConfig's patching fields."""
    mode = hf.patching_mode
    require(mode in EXPORTED_MODES, where, "patching_mode", mode, f"one of {', '.join(EXPORTED_MODES)} is expected")
    if mode == "entropy":
        require(has_entropy_model, where, "patch_in_forward", hf.patch_in_forward,
                "entropy patching needs the patcher: give its weights with --entropy-model")
        require(hf.patch_size is not None, where, "patch_size", None,
                "BltForCausalLM's patcher then ignores the entropies")
    try:
        return PatchingConfig(mode=mode, threshold=hf.patching_threshold if mode == "entropy" else None,
                              patch_size=hf.patch_size or PatchingConfig.patch_size,
                              max_patch_length=hf.max_patch_length)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


# -- configs: ours -> theirs -----------------------------------------------------------------------

def hf_config_kwargs(c: BLTConfig, patching: PatchingConfig, entropy: tuple[EntropyModelConfig, int] | None,
                     seq_len: int, where: str) -> dict:
    """BltConfig's arguments for BltForCausalLM to compute what ByteLatentTransformer(c) does, patched as
    `patching` says (by the entropy model and its context in `entropy`); `where` names the checkpoint."""
    require(c.doubled_cross_attn_residual, where, "model.doubled_cross_attn_residual", False,
            "BltForCausalLM always adds the cross-attention input twice")
    require(c.cross_attn_k >= 2, where, "model.cross_attn_k", c.cross_attn_k,
            "BltForCausalLM keeps a patch projection at k = 1")
    require(c.encoder_dim == c.decoder_dim, where, "model.decoder_dim", c.decoder_dim,
            "BltForCausalLM's decoder reads the encoder's states without a projection: the widths must agree")
    require(not (c.encoder_cross_attn_all_layers and c.encoder_layers > 1), where,
            "model.encoder_cross_attn_all_layers", True,
            "with several encoder layers BltForCausalLM pools the bytes afresh at each")
    require(bool(c.ngram_sizes), where, "model.ngram_sizes", c.ngram_sizes,
            "BltForCausalLM always has hash n-gram embeddings")
    require(patching.mode in EXPORTED_MODES, where, "patching.mode", patching.mode, "BltConfig has no such patching")
    require(patching.mode != "entropy" or entropy is not None, where, "entropy_checkpoint", None,
            "entropy patching needs the entropy model")

    def part(dim, layers, heads, hidden):
        return {"hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": heads,
                "intermediate_size": hidden, "rms_norm_eps": c.norm_eps,
                "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}}

    def local(dim, layers, heads, hidden, all_layers):
        return part(dim, layers, heads, hidden) | {"hidden_size_global": c.global_dim, "cross_attn_k": c.cross_attn_k,
                                                   "cross_attn_all_layers": all_layers}

    kwargs = dict(
        vocab_size=VOCAB_SIZE, max_position_embeddings=seq_len, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        use_cache=False,  # BltForCausalLM's KV cache fails to build (transformers 5.23): every call runs all of it
        local_attention_window_len=c.local_window, cross_attn_k=c.cross_attn_k,
        encoder_hash_byte_group_size=list(c.ngram_sizes), encoder_hash_byte_group_vocab=c.ngram_table_size,
        encoder_hash_byte_group_nb_functions=c.hash_functions,
        patching_mode=patching.mode, patch_in_forward=patching.mode == "entropy", patch_size=patching.patch_size,
        max_patch_length=patching.max_patch_length,
        encoder_config=local(c.encoder_dim, c.encoder_layers, c.encoder_heads, c.encoder_hidden,
                             c.encoder_cross_attn_all_layers),
        decoder_config=local(c.decoder_dim, c.decoder_layers, c.decoder_heads, c.decoder_hidden,
                             c.decoder_cross_attn_all_layers),
        global_config=part(c.global_dim, c.global_layers, c.global_heads, c.global_hidden))
    if patching.mode == "entropy":
        e, context = entropy
        kwargs["patching_threshold"] = patching.threshold
        kwargs["patcher_config"] = {
            "vocab_size": VOCAB_SIZE, "hidden_size": e.dim, "num_hidden_layers": e.n_layers,
            "num_attention_heads": e.n_heads, "intermediate_size": e.ffn_hidden, "rms_norm_eps": e.norm_eps,
            "sliding_window": entropy_window(e, context), "max_position_embeddings": context,
            "rope_parameters": {"rope_type": "default", "rope_theta": e.rope_theta}}
    return kwargs
