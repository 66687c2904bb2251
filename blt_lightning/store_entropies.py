"""`entropies`: shards again, each document with its next-byte entropies stored beside it.

Stage two can then patch from stored entropies instead of running the entropy model on every batch
(the reference precomputes them the same way, for GPU utilisation). Each document is streamed whole
through the frozen entropy model, so every position sees up to a window of earlier bytes of its own
document; the entropies of its ids, BOS to EOS, are stored as float16 in `<key>.entropies.f16`.
The new shards keep the names, keys and documents of the old; the new manifest records the model.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import webdataset as wds
from tqdm import tqdm

from .data import ENTROPY_MEMBER
from .patcher import entropy_window, load_entropy_model
from .prepare import MANIFEST, Document, ShardSlot, write_atomically
from .vocab import encode


def store_entropies(checkpoint: str, manifest_path: str, output: str, device: str = "cpu") -> dict:
    """Write the shards of a manifest, with entropies, under `output`; return the new manifest."""
    model, context = load_entropy_model(checkpoint, device)
    window = entropy_window(model, context)
    source = Path(manifest_path)
    manifest = json.loads(source.read_text())
    out = Path(output)
    if out.resolve() == source.parent.resolve():
        raise ValueError(f"{output}: write the new shards to another directory than the manifest's")
    out.mkdir(parents=True, exist_ok=True)
    total = sum(split["bytes"] for split in manifest["splits"].values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="entropies", disable=None) as bar:
        for split in manifest["splits"].values():
            split["shards"] = [_rewrite(source.parent / s["path"], out, model, window, bar) for s in split["shards"]]
    manifest["entropies"] = {"checkpoint": str(checkpoint), "window": window, "dtype": "float16",
                             "member": ENTROPY_MEMBER}
    write_atomically(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _rewrite(path: Path, out: Path, model, window: int, bar: tqdm) -> dict:
    slot = ShardSlot(out, path.name)
    try:
        for sample in wds.tariterators.tarfile_samples([{"url": str(path)}]):
            data, meta = sample["bin"], json.loads(sample["json"])
            ids = encode(data).to(model.output.weight.device)
            entropies = model.document_entropies(ids, window).half().cpu()
            slot.write(sample["__key__"], Document(data, meta["source"], meta.get("lang")),
                       {ENTROPY_MEMBER: entropies.numpy().tobytes()})
            bar.update(len(data))
    except BaseException:
        slot.discard()
        raise
    return slot.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="blt-lightning entropies",
                                     description="Store next-byte entropies beside each document, in new shards.")
    parser.add_argument("--checkpoint", required=True, help="stage-one (entropy model) checkpoint")
    parser.add_argument("--manifest", required=True, help="manifest.json of the shards to annotate")
    parser.add_argument("--output", "-o", required=True, help="directory for the new shards and manifest")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        with torch.inference_mode():
            store_entropies(args.checkpoint, args.manifest, args.output, args.device)
    except (ValueError, OSError, KeyError) as error:
        sys.exit(f"entropies: {error}")
    print(f"manifest: {Path(args.output) / MANIFEST}")
