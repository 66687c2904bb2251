"""`evaluate`: bits per byte of a checkpoint of either stage on any data, as BLT_SPEC section 5 defines it:
over the whole set, per source and per language, with byte perplexity, the bytes counted and, for BLT,
the mean patch size and inference FLOPs per byte.

    blt-lightning evaluate --checkpoint runs/blt-tiny/version_0/checkpoints/last.ckpt \\
        --data runs/shards/manifest.json --json runs/eval.json

Data is a manifest (its --split), shard URLs (.tar paths and brace patterns, pipe: commands, http URLs),
or text, JSON-lines and directory inputs, which are first prepared into shards under --output-dir as
`prepare` would (one split, every document). It streams through the same evaluation loader as `test`
(rows of the checkpoint's training length, so `evaluate` on a manifest's test split prints the bpb that
`test` does) and runs on any number of devices and nodes through a Lightning Trainer.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from .data import ByteShardDataModule, is_shard_url, read_manifest
from .loading import load_lm
from .outputs import output_problem
from .prepare import PrepareOptions
from .tool_parser import ToolParser


def data_module(data: list[str], output_dir: Path, split: str, seq_len: int, batch_size: int,
                num_workers: int, reading: PrepareOptions = PrepareOptions()) -> ByteShardDataModule:
    """The DataModule whose test loader streams `data`; inputs to prepare are read as `reading` says (its
    text_field and skip_malformed: its splits are replaced by one)."""
    common = {"seq_len": seq_len, "batch_size": batch_size, "num_workers": num_workers}
    manifests = [spec for spec in data if spec.endswith(".json")]
    if manifests:
        if len(data) > 1:
            raise ValueError(f"give one manifest alone, not {data}")
        if split not in (splits := read_manifest(manifests[0])):
            raise ValueError(f"{manifests[0]}: no {split} split (it has {', '.join(splits) or 'none'}): "
                             f"choose one with --split")
        return ByteShardDataModule(manifest=manifests[0], test_split=split, **common)
    shard_urls = [spec for spec in data if is_shard_url(spec)]
    if shard_urls and len(shard_urls) < len(data):
        raise ValueError(f"give shards or inputs to prepare, not both: {data}")
    if shard_urls:
        return ByteShardDataModule(test_shards=shard_urls, **common)
    # Every document in one split (prepare calls it train), prepared once by global rank 0.
    return ByteShardDataModule(sources=data, shard_dir=str(output_dir / "shards"), test_split="train",
                               prepare=replace(reading, val_fraction=0.0, test_fraction=0.0), **common)


def evaluate(checkpoint: str, data: list[str], output_dir: str | Path = "runs/evaluate", split: str = "test",
             batch_size: int = 8, seq_len: int | None = None, num_workers: int = 0,
             reading: PrepareOptions = PrepareOptions(), **trainer_kwargs) -> dict:
    """The report of one checkpoint on `data` (see the module docstring; `reading` as data_module takes it);
    trainer_kwargs go to L.Trainer (accelerator, devices, num_nodes, strategy, precision)."""
    module = load_lm(checkpoint)
    if seq_len is not None:
        module.seq_len = seq_len
    output_dir = Path(output_dir)
    datamodule = data_module(data, output_dir, split, module.seq_len, batch_size, num_workers, reading)
    module.test_label = split if any(spec.endswith(".json") for spec in data) else "inputs"
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=output_dir, **trainer_kwargs)
    trainer.test(module, datamodule=datamodule, verbose=False)
    return {"checkpoint": str(checkpoint), "model": type(module).__name__, "data": data,
            "seq_len": module.seq_len, **module.test_report}


def format_report(report: dict) -> str:
    lines = [f"bpb {report['bpb']:.4f} over {report['bytes']:,} bytes "
             f"(byte perplexity {report['byte_perplexity']:.3f})"]
    if "mean_patch_size" in report:
        lines.append(f"mean patch size {report['mean_patch_size']:.2f} bytes")
    lines.append(f"inference {report['flops_per_byte'] / 1e6:.2f} MFLOPs per byte")
    for kind in ("per_source", "per_lang"):
        width = max(len(name) for name in report[kind]) if report[kind] else 0
        lines.append(f"{kind.replace('_', ' ')}:")
        lines += [f"  {name:<{width}}  bpb {g['bpb']:.4f}  {g['bytes']:>12,} bytes" for name, g in report[kind].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser(prog="blt-lightning evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of either stage (EntropyLM or BLTLM)")
    parser.add_argument("--data", nargs="+", required=True,
                        help="a manifest, shard URLs, or text / JSON-lines files and directories to prepare")
    parser.add_argument("--split", default="test", help="the manifest's split to evaluate")
    parser.add_argument("--text-field", default="text",
                        help="field of a JSON-lines record that holds the document (default: text)")
    parser.add_argument("--skip-malformed", action="store_true",
                        help="skip (and count) malformed JSON lines instead of stopping at the first")
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/evaluate"),
                        help="where inputs are prepared into shards")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch on each device")
    parser.add_argument("--seq-len", type=int, help="bytes a row (default: the checkpoint's training rows)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per device")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu, ... as the Trainer takes it")
    parser.add_argument("--devices", default="auto", help="devices per node: a count, a list, or auto")
    parser.add_argument("--num-nodes", type=int, default=1, help="machines, each with --devices")
    parser.add_argument("--strategy", default="auto", help="e.g. ddp, fsdp")
    parser.add_argument("--precision", default=None, help="e.g. bf16-mixed (default: the Trainer's, float32)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.seq_len is not None and args.seq_len < 1):
        parser.error("--batch-size and --seq-len must be at least 1")
    if problem := (args.json and output_problem(args.json)) or output_problem(args.output_dir, folder=True):
        parser.error(problem)
    if args.devices.isdigit() and int(args.devices) < 1:
        parser.error("--devices must be at least 1 (or a list, or auto)")
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    try:
        report = evaluate(args.checkpoint, args.data, args.output_dir, args.split, args.batch_size, args.seq_len,
                          args.num_workers, PrepareOptions(text_field=args.text_field,
                                                           skip_malformed=args.skip_malformed),
                          accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes,
                          strategy=args.strategy, precision=args.precision)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"evaluate: {error}")
    write_report(report, args.json)


@rank_zero_only
def write_report(report: dict, path: Path | None) -> None:
    print(format_report(report))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
