"""`entropies`: shards again, each document with its next-byte entropies stored beside it.

Stage two can then patch from stored entropies instead of running the entropy model on every batch
(the reference precomputes them the same way, for GPU utilisation). Each document is streamed whole
through the frozen entropy model, so every position sees up to a window of earlier bytes of its own
document; the entropies of its ids, BOS to EOS, are stored as float16 in `<key>.entropies.f16`.
The new shards keep the names, keys and documents of the old; the new manifest records the model. As
`prepare`'s, they take their names only once all are written: a run that fails leaves the output as it was.
"""

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .data import manifest_shards
from .outputs import byte_progress, check_output_dir
from .patcher import entropy_window, load_entropy_model, weights_sha256
from .prepare import MANIFEST, Document, PendingShards, ShardSlot, load_manifest
from .streams import ENTROPY_MEMBER, UNKNOWN, Shard, shard_samples
from .tool_parser import ToolParser
from .vocab import encode


def store_entropies(checkpoint: str, manifest_path: str, output: str, device: str = "cpu",
                    overwrite: bool = False) -> dict:
    """Write the shards of a manifest, with entropies, under `output` (a new or empty directory, unless
    `overwrite`); return the new manifest."""
    source, out = Path(manifest_path), Path(output)
    if out.resolve() == source.parent.resolve():
        raise ValueError(f"{output}: write the new shards to another directory than the manifest's")
    check_output_dir(out, overwrite)
    manifest = load_manifest(manifest_path)
    shards = manifest_shards(manifest, manifest_path)  # a clear error now, for a manifest that is not one
    model, context = load_entropy_model(checkpoint, device)
    window = entropy_window(model.config, context)
    out.mkdir(parents=True, exist_ok=True)
    total, pending = sum(split["bytes"] for split in manifest["splits"].values()), PendingShards(out)
    try:
        with byte_progress(total, "entropies") as bar:
            for name, split in manifest["splits"].items():
                split["shards"] = [pending.finish(_rewrite(shard, out, model, window, bar)) for shard in shards[name]]
    except BaseException:
        pending.discard()
        raise
    manifest["entropies"] = {"checkpoint": str(checkpoint), "window": window, "dtype": "float16",
                             "member": ENTROPY_MEMBER, "weights_sha256": weights_sha256(model)}
    pending.publish(manifest, "entropies")
    return manifest


def _rewrite(shard: Shard, out: Path, model, window: int, bar: tqdm) -> ShardSlot:
    """The shard with entropies, written (not yet finished) in a slot."""
    slot = ShardSlot(out, Path(shard.url).name)
    try:
        for sample in shard_samples(shard):  # a bad shard is an error naming it
            ids = encode(sample.data).to(model.output.weight.device)
            entropies = model.document_entropies(ids, window).half().cpu()
            document = Document(sample.data, sample.meta.get("source", UNKNOWN), sample.meta.get("lang"))
            slot.write(sample.key, document, {ENTROPY_MEMBER: entropies.numpy().tobytes()})
            bar.update(len(sample.data))
    except BaseException:
        slot.discard()
        raise
    return slot


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser(prog="blt-lightning entropies",
                        description="Store next-byte entropies beside each document, in new shards.")
    parser.add_argument("--checkpoint", required=True, help="stage-one (entropy model) checkpoint")
    parser.add_argument("--manifest", required=True, help="manifest.json of the shards to annotate")
    parser.add_argument("--output", "-o", required=True, help="directory for the new shards and manifest")
    parser.add_device_argument()
    parser.add_argument("--overwrite", action="store_true", help="write into an --output that is not empty")
    args = parser.parse_args(argv)
    try:
        with torch.inference_mode():
            store_entropies(args.checkpoint, args.manifest, args.output, args.device, args.overwrite)
    except (ValueError, OSError, KeyError) as error:
        sys.exit(f"entropies: {error}")
    print(f"manifest: {Path(args.output) / MANIFEST}")
