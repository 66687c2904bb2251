"""`import-hf`: a Hugging Face transformers BLT as checkpoints of this project.

The folder BltForCausalLM.save_pretrained writes (config.json, model.safetensors) becomes checkpoints that
`evaluate` and `generate` take, and that a fine-tuning `fit` starts from (init_from).

    blt-lightning import-hf --model hf/blt-1b --output runs/blt-1b-hf

writes to --output:
- blt.ckpt: the BLTLM (stage two), carrying its entropy model when it patches by entropy;
- entropy.ckpt: the EntropyLM (stage one), when there is a patcher: the one inside BltForCausalLM (saved with
  patch_in_forward on), or --entropy-model's: facebook/blt-entropy, the reference code's entropy_model folder,
  or a BltPatcher.save_pretrained folder;
- finetune.yaml: the imported shape, patching, paths and rows (--seq-len), to compose after
  configs/blt/finetune-hf.yaml.
How the two formats correspond, and what cannot be represented (refused, naming the file and field): hf.py.
"""

import inspect
import json
import pickle
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path

import lightning
import torch
import yaml

from .blt_lm import BLTLM
from .entropy_lm import EntropyLM
from .errors import read_json_object
from .hf import (PATCHER, blt_config_from_hf, blt_from_hf, blt_hf_names, entropy_config_from_hf, entropy_names,
                 ffn_multiple_of, from_hf, patching_from_hf, require, transformers_module)
from .models import EntropyModel, EntropyModelConfig
from .models.blt import ByteLatentTransformer
from .models.layers import parts_as_stacked, stacked_as_parts
from .outputs import check_output_dir
from .patcher import CARRIED_ENTROPY_MODEL, carried_entropy_model
from .tool_parser import ToolParser
from .vocab import VOCAB_SIZE

REFERENCE_WINDOW = 512  # the reference's loader gives its entropy model this window; params.json does not say it


def read_config(directory: Path, model_type: str):
    """The BltConfig (model_type "blt") or BltPatcherConfig ("blt_patcher") of directory/config.json."""
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json here (download the model's folder first)")
    found = read_json_object(path, "a model config").get("model_type")
    require(found == model_type, str(path), "model_type", found, f"a {model_type} config is expected")
    classes = {"blt": "BltConfig", "blt_patcher": "BltPatcherConfig"}
    return getattr(transformers_module(), classes[model_type]).from_pretrained(directory)


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors or, without one, of the shards its index names: the file transformers'
    from_pretrained reads where both are (as after an export over an earlier save in shards)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or no {tensor: file} weight_map
            raise ValueError(f"{index}: not a safetensors index (a JSON object whose weight_map maps tensor names "
                             "to files)") from None
    else:
        raise FileNotFoundError(f"{directory}: no model.safetensors (nor model.safetensors.index.json) here")
    weights = {}
    for name in files:
        try:
            weights |= load_file(directory / name)
        except (OSError, SafetensorError) as error:  # missing, cut short, not safetensors
            raise ValueError(f"{directory / name}: not a readable safetensors file ({error})") from None
    return weights


def check_shapes(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """`state` holds the tensors of `model` (built on the meta device: no memory), in the shapes it gives them,
    blocks' parts separate (as from_hf gives them)."""
    expected = {name: tuple(w.shape) for name, w in stacked_as_parts(model.state_dict()).items()}
    found = {name: tuple(w.shape) for name, w in state.items()}
    wrong = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
    require(not wrong, where, "tensors", wrong[:3], f"shapes {[found.get(n) for n in wrong[:3]]} where the config "
            f"says {[expected.get(n) for n in wrong[:3]]} (None: no such tensor)")


def reference_entropy_model(args: dict, field: str, where: str, window: int | None, stored: dict[str, torch.Tensor],
                            tensors_at: str) -> tuple[EntropyModelConfig, int, dict[str, torch.Tensor]]:
    """The reference code's entropy model (LMTransformer): its arguments `args` (`field` in the file `where`) and
    its state dict, named as ours, its RoPE rotating interleaved pairs."""
    require(isinstance(args, dict) and all(k in args for k in ("dim", "n_layers", "n_heads", "max_seqlen")), where,
            field, args, "the entropy model's dim, n_layers, n_heads and max_seqlen are expected there")
    dim, heads = args["dim"], args["n_heads"]
    require(args.get("n_kv_heads") in (None, heads), where, f"{field}.n_kv_heads", args.get("n_kv_heads"),
            "grouped-query attention is not implemented here")
    require(args.get("vocab_size", VOCAB_SIZE) == VOCAB_SIZE, where, f"{field}.vocab_size", args.get("vocab_size"),
            f"the byte vocabulary here has {VOCAB_SIZE} ids")
    multiple = args.get("multiple_of", 256)  # the reference's FeedForward width: 8/3 dim, scaled, rounded up
    hidden = multiple * -(-int((args.get("ffn_dim_multiplier") or 1.0) * int(8 * dim / 3)) // multiple)
    config = EntropyModelConfig(dim=dim, n_layers=args["n_layers"], n_heads=heads, sliding_window=window,
                                rope_theta=args.get("rope_theta", 10000.0), norm_eps=args.get("norm_eps", 1e-5),
                                ffn_multiple_of=ffn_multiple_of(dim, hidden, where, f"{field}.ffn_dim_multiplier"))
    names = {ours: (ours, rotated) for ours, (_, rotated) in entropy_names(config, "").items()}  # our names there too
    return config, args["max_seqlen"], from_hf(stored, names, tensors_at)


def separate_entropy_model(directory: Path) -> tuple[EntropyModelConfig, int, dict[str, torch.Tensor], str]:
    """--entropy-model, one of three folders: the reference's training output (params.json, consolidated.pth: as
    facebook/blt-1b's entropy_model/), the reference's save_pretrained (config.json of {"args": ...},
    model.safetensors: facebook/blt-entropy), or BltPatcher.save_pretrained's (config.json, model.safetensors).
    Also the file its weights came from."""
    params, config_json = directory / "params.json", directory / "config.json"
    if params.is_file():
        weights = directory / "consolidated.pth"
        try:
            stored = torch.load(weights, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as error:  # cut short, or no torch.save file
            raise ValueError(f"{weights}: not a readable checkpoint ({error})") from None
        args = read_json_object(params, "the reference's params.json").get("entropy_model")
        return (*reference_entropy_model(args, "entropy_model", str(params), REFERENCE_WINDOW,
                                         stored.get("model", stored), str(weights)), str(weights))
    tensors_at = str(directory / "model.safetensors")
    if config_json.is_file() and "args" in (saved := read_json_object(config_json, "a model config")):
        args = saved["args"]
        return (*reference_entropy_model(args, "args", str(config_json), args.get("sliding_window"),
                                         read_safetensors(directory), tensors_at), tensors_at)
    config, context = entropy_config_from_hf(read_config(directory, "blt_patcher"), str(config_json), "config")
    return config, context, from_hf(read_safetensors(directory), entropy_names(config, ""), tensors_at), tensors_at


def plain(value):
    """A hyperparameter as LightningCLI saves it: dataclasses as dicts, tuples as lists."""
    return json.loads(json.dumps(asdict(value))) if is_dataclass(value) else value


def lightning_checkpoint(module_class: type, state_dict: dict[str, torch.Tensor], **init_args) -> dict:
    """What `fit` would have saved of a module_class(**init_args) with these weights, less the training state."""
    parameters = inspect.signature(module_class.__init__).parameters
    hparams = {name: plain(init_args.get(name, p.default)) for name, p in parameters.items() if name != "self"}
    return {"epoch": 0, "global_step": 0, "pytorch-lightning_version": lightning.__version__, "state_dict": state_dict,
            "hparams_name": "kwargs",
            "hyper_parameters": {"_class_path": f"blt_lightning.{module_class.__name__}", **hparams,
                                 "_instantiator": "lightning.pytorch.cli.instantiate_module"}}


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + name: tensor for name, tensor in state.items()}


def import_hf(model_dir: str | Path, output: str | Path, entropy_model: str | Path | None = None,
              seq_len: int | None = None) -> dict[str, Path]:
    """Write blt.ckpt (and entropy.ckpt, finetune.yaml) to `output` from a BltForCausalLM folder; the paths written."""
    model_dir, output = Path(model_dir), Path(output).resolve()
    where, tensors_at = str(model_dir / "config.json"), str(model_dir / "model.safetensors")
    hf = read_config(model_dir, "blt")
    config = blt_config_from_hf(hf, where)
    weights = read_safetensors(model_dir)
    entropy = None
    if entropy_model is not None:
        entropy = separate_entropy_model(Path(entropy_model))
    elif hf.patch_in_forward:
        e_config, context = entropy_config_from_hf(hf.patcher_config, where)
        entropy = e_config, context, from_hf(weights, entropy_names(e_config, PATCHER), tensors_at), tensors_at
    patching = patching_from_hf(hf, where, entropy is not None)
    state = blt_from_hf(weights, config, tensors_at)
    unused = sorted(n for n in set(weights) - blt_hf_names(config) if not n.startswith(PATCHER))
    require(not unused, tensors_at, "tensors", unused[:3],
            f"{len(unused)} tensors have no place in the model of {where}")
    with torch.device("meta"):
        check_shapes(ByteLatentTransformer(config), state, tensors_at)
        if entropy is not None:
            check_shapes(EntropyModel(entropy[0]), entropy[2], entropy[3])
    state = parts_as_stacked(state)  # the checkpoints hold our layout

    output.mkdir(parents=True, exist_ok=True)
    written = {"blt": output / "blt.ckpt", "finetune": output / "finetune.yaml"}
    blt_state, carried, entropy_checkpoint = prefixed("model.", state), None, None
    if entropy is not None:
        e_config, context, e_state, _ = entropy
        e_state = parts_as_stacked(e_state)  # the checkpoints hold our layout
        written["entropy"] = output / "entropy.ckpt"
        torch.save(lightning_checkpoint(EntropyLM, prefixed("model.", e_state), model=e_config, seq_len=context),
                   written["entropy"])
        if patching.needs_entropies:  # BLTLM carries its entropy model beside its own, as on_save_checkpoint writes it
            blt_state |= prefixed("entropy_model.", e_state)
            carried, entropy_checkpoint = carried_entropy_model(e_config, context), str(written["entropy"])
    seq_len = seq_len or hf.max_position_embeddings
    blt = lightning_checkpoint(BLTLM, blt_state, model=config, patching=patching, entropy_checkpoint=entropy_checkpoint,
                               seq_len=seq_len)
    if carried is not None:
        blt[CARRIED_ENTROPY_MODEL] = carried
    torch.save(blt, written["blt"])
    init_args = {"model": {k: v for k, v in plain(config).items() if k != "attention"},  # attention: the run's choice
                 "patching": plain(patching), "entropy_checkpoint": entropy_checkpoint,
                 "init_from": str(written["blt"])}
    written["finetune"].write_text(f"# import-hf of {model_dir.resolve()}: compose after configs/blt/finetune-hf.yaml\n"
                                   + yaml.safe_dump({"model": {"init_args": init_args},
                                                     "data": {"init_args": {"seq_len": seq_len}}}, sort_keys=False))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser(prog="blt-lightning import-hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path,
                        help="folder of a BltForCausalLM: config.json, model.safetensors")
    parser.add_argument("--entropy-model", type=Path,
                        help="folder of its entropy model, when the model has none inside (patch_in_forward off): "
                             "BltPatcher's (config.json) or the reference code's (params.json, consolidated.pth)")
    parser.add_argument("--output", required=True, type=Path,
                        help="folder for blt.ckpt, entropy.ckpt and finetune.yaml")
    parser.add_argument("--seq-len", type=int,
                        help="bytes a row for evaluation and training (default: its max_position_embeddings)")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output that is not empty")
    args = parser.parse_args(argv)
    if args.seq_len is not None and args.seq_len < 1:
        parser.error("--seq-len must be at least 1")
    try:
        written = import_hf(args.model, check_output_dir(args.output, args.overwrite), args.entropy_model,
                            args.seq_len)
    except (FileNotFoundError, ValueError, ImportError) as error:
        sys.exit(f"import-hf: {error}")
    for kind, path in written.items():
        print(f"{kind}: {path}")
