"""`export-hf`: a stage-two checkpoint of this project as a Hugging Face transformers BLT.

It writes config.json and model.safetensors, which BltForCausalLM.from_pretrained loads, computing the same logits.

    blt-lightning export-hf --checkpoint runs/blt-1b-finetune/version_0/checkpoints/last.ckpt --output hf/blt-1b-ft

A model trained with doubled_cross_attn_residual (as imported ones and finetune-hf.yaml are) and in a shape
BltConfig can state: BltForCausalLM always adds the cross-attention input twice.

Entropy patching goes with its entropy model as BltForCausalLM's patcher (patch_in_forward): it patches
as we do. Static, space and byte patching are written as patching_mode only: BltForCausalLM then makes
1-byte patches (what byte patching is) unless given patch_lengths: blt_lightning.patching.patch(...).lengths,
with an empty patch appended so that a row's last position reads what ours does (hf.py). Monotonic and
combined patching, and what else BltConfig cannot express, are refused, naming the field.
"""

import os
import sys
from pathlib import Path

from .blt_lm import BLTLM
from .hf import PATCHER, blt_to_hf, entropy_names, hf_config_kwargs, to_hf, transformers_module
from .loading import load_lm
from .outputs import as_umask_allows, check_output_dir, write_atomically
from .tool_parser import ToolParser


def export_hf(checkpoint: str | Path, output: str | Path) -> Path:
    """Write config.json and model.safetensors of a BLTLM checkpoint to `output`; returns it."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    lm = load_lm(checkpoint)
    if not isinstance(lm, BLTLM):
        raise ValueError(f"{checkpoint}: a stage-one (EntropyLM) checkpoint; BltForCausalLM is a whole BLT: "
                         "give a stage-two one")
    entropy = (lm.entropy_model.config, lm.entropy_context) if lm.entropy_model is not None else None
    kwargs = hf_config_kwargs(lm.model.config, lm.patcher.config, entropy, lm.seq_len, str(checkpoint))
    config = transformers_module().BltConfig(**kwargs)
    weights = blt_to_hf(lm.model.state_dict(), lm.model.config)
    if kwargs["patch_in_forward"]:
        weights |= to_hf(lm.entropy_model.state_dict(), entropy_names(lm.entropy_model.config, PATCHER))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    # Each file whole or not at all, the weights first: an export that fails on its weights leaves the folder as
    # it was. (Over an earlier save in shards, transformers reads model.safetensors, not the index: so does import.)
    partial = output / ".model.safetensors.partial"
    try:
        save_file(weights, partial, metadata={"format": "pt"})  # the metadata transformers expects
        as_umask_allows(partial)
        os.replace(partial, output / "model.safetensors")
    except SafetensorError as error:
        raise OSError(f"{output / 'model.safetensors'}: {error}") from None
    finally:
        partial.unlink(missing_ok=True)
    write_atomically(output / "config.json", config.to_json_string(use_diff=True))  # what save_pretrained writes
    return output


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser(prog="blt-lightning export-hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a stage-two (BLTLM) checkpoint")
    parser.add_argument("--output", required=True, type=Path, help="folder for config.json and model.safetensors")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output that is not empty")
    args = parser.parse_args(argv)
    try:
        output = export_hf(args.checkpoint, check_output_dir(args.output, args.overwrite))
    except (OSError, ValueError, ImportError) as error:
        sys.exit(f"export-hf: {error}")
    print(f"wrote {output / 'config.json'} and {output / 'model.safetensors'}")
