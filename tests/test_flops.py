"""The analytic FLOPs per byte agree with what PyTorch's FLOP counter sees the models run."""

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from blt_lightning.flops import blt_flops_per_byte, entropy_model_flops_per_byte, mean_keys
from blt_lightning.models import EntropyModel, EntropyModelConfig
from blt_lightning.models.blt import BLTConfig, ByteLatentTransformer
from blt_lightning.patching import PatchingConfig, patch


def matmul_flops(run) -> int:
    """FLOPs of the weight matrices' products (aten.mm/addmm: nn.Linear), not of attention."""
    with FlopCounterMode(display=False) as counter:
        run()
    counts = counter.get_flop_counts()["Global"]
    return sum(n for op, n in counts.items() if str(op).split(".")[1] in ("mm", "addmm"))


def test_mean_keys_counts_what_a_causal_window_sees():
    assert mean_keys(4, None) == (1 + 2 + 3 + 4) / 4
    assert mean_keys(6, 2) == (1 + 2 + 2 + 2 + 2 + 2) / 6


def test_entropy_model_flops_per_byte_match_the_counter():
    config, L = EntropyModelConfig(dim=64, n_layers=2, n_heads=4, ffn_multiple_of=32), 48
    model = EntropyModel(config)
    counted = matmul_flops(lambda: model(torch.randint(4, 260, (2, L))))
    assert counted == 2 * L * entropy_model_flops_per_byte(config, L, attention=False)
    assert entropy_model_flops_per_byte(config, L) > entropy_model_flops_per_byte(config, L, attention=False)


def test_blt_flops_per_byte_match_the_counter_and_fall_with_longer_patches():
    config = BLTConfig(encoder_dim=32, encoder_layers=1, encoder_heads=2, global_dim=64, global_layers=2,
                       global_heads=4, decoder_dim=48, decoder_layers=2, decoder_heads=2, local_window=16,
                       ngram_sizes=(3,), ngram_table_size=31, ffn_multiple_of=16, attention="dense")
    model, L = ByteLatentTransformer(config), 64
    ids = torch.randint(4, 260, (2, L))
    patches = patch(ids, PatchingConfig(mode="static", patch_size=4))
    counted = matmul_flops(lambda: model(ids, patches))
    per_patch = L / patches.lengths.shape[1]  # what the model runs: patches padded to the same count per row
    assert counted == round(2 * L * blt_flops_per_byte(config, L, per_patch, attention=False))
    assert blt_flops_per_byte(config, L, 8.0) < blt_flops_per_byte(config, L, 4.0)


def test_the_models_count_the_same_flops_on_the_meta_device():
    """As Lightning's measure_flops counts them: on the meta device (no memory, no arithmetic), the same products
    as on the CPU, with sdpa's block masks."""
    blt = BLTConfig(encoder_dim=32, encoder_layers=1, encoder_heads=2, global_dim=64, global_layers=2, global_heads=4,
                    decoder_dim=32, decoder_layers=1, decoder_heads=2, local_window=16, ngram_sizes=(3,),
                    ngram_table_size=31, ffn_multiple_of=16)
    entropy = EntropyModelConfig(dim=32, n_layers=2, n_heads=2, sliding_window=16, ffn_multiple_of=16)
    ids = torch.randint(4, 260, (2, 64))
    patches = patch(ids, PatchingConfig(mode="static", patch_size=4))
    on_meta = dataclasses.replace(patches, **{f.name: getattr(patches, f.name).to("meta")
                                              for f in dataclasses.fields(patches)
                                              if isinstance(getattr(patches, f.name), torch.Tensor)})
    for build, args, meta_args in ((lambda: ByteLatentTransformer(blt), (ids, patches), (ids.to("meta"), on_meta)),
                                   (lambda: EntropyModel(entropy), (ids,), (ids.to("meta"),))):
        model = build()
        with torch.device("meta"):
            meta_model = build()
        assert matmul_flops(lambda: meta_model(*meta_args)) == matmul_flops(lambda: model(*args)) > 0
    assert meta_model.entropies(ids.to("meta")).shape == ids.shape  # the last model built: the entropy model
