"""`calibrate`: the entropy threshold that gives a target mean patch size on a sample of the data.

The mean patch size never falls as the threshold rises, so a bisection over thresholds finds it; the
answer is the threshold whose mean patch size on the sample is closest to the target. The sample is
whole documents drawn at random (seeded) from all of the data, which is read through once. Its
entropies are computed once, then patched again for every threshold tried: by default each document
streamed whole through the frozen model (as generation and stored entropies see it); with --seq_len, in
rows of that many ids as stage two's DataModule packs documents and its patcher sees them (each row
alone, so a row that starts inside a document starts with no context and a patch of its own: on the
demo's data, rows of 256 bytes have patches 3% shorter than whole documents at the same threshold: 4.36
bytes against 4.50). The result is printed and written as a YAML snippet that stage two's configs
compose with (`--config snippet.yaml`).
"""

import heapq
import math
import random
import sys
from dataclasses import replace
from pathlib import Path

import torch

from .data import iter_documents
from .outputs import byte_progress, output_problem
from .patcher import entropy_window, load_entropy_model
from .patching import PatchingConfig, patch
from .tool_parser import ToolParser
from .vocab import VOCAB_SIZE, encode

SEARCH_STEPS = 60
TOLERANCE = 0.02  # of the target mean patch size


def sample_documents(data: list[str], split: str, sample_bytes: int, seed: int = 0) -> list[bytes]:
    """A uniform random sample of the documents of `data` (of a manifest's `split`), in their order there: those
    with the lowest random keys, until their bytes reach sample_bytes. Every document is read: shards keep their
    inputs' order, so the first documents would be the first input file's, and a corpus of several sources would
    be calibrated on one."""
    if sample_bytes < 1:
        raise ValueError(f"sample_bytes must be at least 1, not {sample_bytes}")
    rng, kept, kept_bytes = random.Random(seed), [], 0  # kept: a heap of (-key, position, document)
    with byte_progress(None, "reading documents") as bar:
        for position, doc in enumerate(iter_documents(data, split)):
            bar.update(len(doc))
            if not doc:
                continue
            heapq.heappush(kept, (-rng.random(), position, doc))
            kept_bytes += len(doc)
            while kept_bytes - len(kept[0][2]) >= sample_bytes:  # the highest key is not needed to reach the size
                kept_bytes -= len(heapq.heappop(kept)[2])
    return [doc for _, _, doc in sorted(kept, key=lambda item: item[1])]


def sample_entropies(model, window: int, data: list[str], split: str, sample_bytes: int,
                     seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and entropies of a sample of documents from `data` (sample_documents): [1, N] of whole documents, or
    with seq_len [R, seq_len] of them end to end in rows, each row's entropies computed alone."""
    docs = sample_documents(data, split, sample_bytes)
    if not docs:
        raise ValueError(f"no documents in {data} ({split} split for manifests)")
    ids = [encode(doc).to(model.output.weight.device) for doc in docs]
    if seq_len is None:
        with byte_progress(sum(map(len, docs)), "entropies") as bar:
            entropies = []
            for doc, doc_ids in zip(docs, ids):
                entropies.append(model.document_entropies(doc_ids, window))
                bar.update(len(doc))
        return torch.cat(ids)[None], torch.cat(entropies)[None]
    ids = torch.cat(ids)
    if len(ids) < seq_len:
        raise ValueError(f"the sample ({len(ids):,} ids) is shorter than one row of {seq_len}")
    rows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    with torch.no_grad():
        entropies = [model.entropies(part, window=window) for part in rows.split(max(1, 2**16 // seq_len))]
    return rows, torch.cat(entropies)


def mean_patch_size(ids: torch.Tensor, entropies: torch.Tensor, config: PatchingConfig) -> float:
    return patch(ids, config, entropies).mean_size


def calibrate(ids: torch.Tensor, entropies: torch.Tensor, config: PatchingConfig,
              target: float) -> tuple[PatchingConfig, float]:
    """The config with the threshold (relative_threshold in monotonic mode) whose mean patch size on
    ids/entropies [B, N] is closest to `target`, and that mean patch size."""
    field = "relative_threshold" if config.mode == "monotonic" else "threshold"
    limit = math.log(VOCAB_SIZE) + 1e-3  # entropies lie in [0, ln 260]; their differences in [-ln 260, ln 260]
    low, high = (-limit if field == "relative_threshold" else 0.0), limit

    def size(value: float) -> float:
        return mean_patch_size(ids, entropies, replace(config, **{field: value}))

    if not size(low) <= target <= size(high):
        raise ValueError(f"a mean patch size of {target} is out of reach in {config.mode} mode: between "
                         f"{size(low):.3f} and {size(high):.3f} on this sample")
    for _ in range(SEARCH_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if size(middle) < target else (low, middle)
    best = min((low, high), key=lambda value: abs(size(value) - target))
    if abs(size(best) - target) > TOLERANCE * target:
        raise ValueError(f"the closest mean patch size on this sample is {size(best):.3f}, more than "
                         f"{TOLERANCE:.0%} from {target}: sample more bytes (--sample_bytes)")
    return replace(config, **{field: best}), size(best)


def snippet(config: PatchingConfig, achieved: float, target: float, sample: str, checkpoint: str) -> str:
    """YAML that sets stage two's patching; composes with a stage-two config."""
    fields = {"mode": config.mode, "threshold": config.threshold, "relative_threshold": config.relative_threshold,
              "max_patch_length": config.max_patch_length}
    lines = [
        f"# blt-lightning calibrate: mean patch size {achieved:.3f} (target {target}) on {sample},",
        f"# entropy model {checkpoint}. Use with a stage-two config: fit --config ... --config this.yaml",
        "model:", "  init_args:", "    patching:",
    ]
    for key, value in fields.items():
        text = "null" if value is None else (f"{value:.6f}" if isinstance(value, float) else str(value))
        lines.append(f"      {key}: {text}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser(
        prog="blt-lightning calibrate",
        description="Find the entropy threshold that gives a target mean patch size, and write it as YAML "
                    "for stage two.",
    )
    parser.add_argument("--checkpoint", required=True, help="stage-one (entropy model) checkpoint")
    parser.add_argument("--data", nargs="+", required=True,
                        help="manifest.json, shard URLs, or text / JSON-lines files and directories")
    parser.add_argument("--split", default="validation", help="split of a manifest to sample (default: validation)")
    parser.add_argument("--target", type=float, required=True,
                        help="mean patch size to reach, in bytes (the paper's runs: about 4.5)")
    parser.add_argument("--mode", choices=["entropy", "monotonic", "combined"], default="entropy")
    parser.add_argument("--relative_threshold", type=float, default=0.0,
                        help="kept fixed in combined mode (default: 0)")
    parser.add_argument("--max_patch_length", type=int, default=None, help="cut longer patches (default: no limit)")
    parser.add_argument("--sample_bytes", type=int, default=1_000_000,
                        help="bytes of whole documents to sample, drawn at random from all of the data, which is "
                             "read through once (default: 1e6)")
    parser.add_argument("--seq_len", type=int, default=None,
                        help="patch rows of this many ids, as stage two trains and evaluates with its model's "
                             "patcher (its data.seq_len); default: whole documents, as generation patches")
    parser.add_argument("--output",
                        help="YAML snippet to write (default: patching-MODE-TARGET.yaml beside the checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    parser.add_device_argument()
    args = parser.parse_args(argv)
    if args.sample_bytes < 1 or (args.seq_len is not None and args.seq_len < 1):
        parser.error("--sample_bytes and --seq_len must be at least 1")
    output = Path(args.output or Path(args.checkpoint).parent / f"patching-{args.mode}-{args.target:g}.yaml")
    if problem := output_problem(output):
        parser.error(problem)
    if output.exists() and not args.overwrite:
        parser.error(f"{output} exists (a calibration?): pass --overwrite to replace it")
    try:
        model, context = load_entropy_model(args.checkpoint, args.device)
        window = entropy_window(model.config, context)
        ids, entropies = sample_entropies(model, window, args.data, args.split, args.sample_bytes, args.seq_len)
        start = PatchingConfig(mode=args.mode, threshold=None if args.mode == "monotonic" else 0.0,
                               relative_threshold=args.relative_threshold, max_patch_length=args.max_patch_length)
        config, achieved = calibrate(ids, entropies, start, args.target)
    except (ValueError, OSError) as error:
        sys.exit(f"calibrate: {error}")
    sample = f"{int((ids >= 4).sum()):,} bytes" + (f" in rows of {args.seq_len}" if args.seq_len else "")
    value = config.relative_threshold if config.mode == "monotonic" else config.threshold
    print(f"{config.mode} threshold {value:.6f}: mean patch size {achieved:.3f} (target {args.target}) on {sample}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(snippet(config, achieved, args.target, sample, args.checkpoint))
    print(f"wrote {output}")
