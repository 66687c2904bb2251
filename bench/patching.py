"""Patching throughput: next-byte entropies plus boundary decisions, in MB of text per second.

For each entropy-model shape ("tiny": configs/entropy/tiny.yaml, "base": configs/entropy/base.yaml)
an EntropyModel with random weights patches rows of real text (documents from a JSONL corpus packed
into rows of --seq_len ids, --batch_size rows a batch) in entropy mode, the threshold set at the
median entropy of the first batch (see median_threshold) so that the boundary rule does real work.
After --warmup batches, three things are timed over --batches batches:

- entropy:    Patcher.entropies (the model's forward and the entropy of its softmax)
- boundaries: Patcher.__call__ given those entropies (patch starts, ids, lengths, mask)
- total:      Patcher.__call__ from ids alone, both stages in one call

Throughput counts the text bytes of the rows (BOS and EOS ids excluded); 1 MB = 1e6 bytes. Where
Hugging Face transformers is installed, its BltPatcher is timed the same way with a model of the
same shape, as a reference ("hf_blt_patcher" in each shape's result).

    python bench/patching.py [--device cuda] [--dtype bfloat16] [--shapes tiny,base] [--seq_len 1024]

Prints one JSON object on stdout; progress goes to stderr.
"""

import argparse
import gzip
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from blt_lightning.streams import pack_rows
from blt_lightning.models import EntropyModel, EntropyModelConfig
from blt_lightning.patcher import Patcher
from blt_lightning.patching import PatchingConfig
from blt_lightning.vocab import PAD, VOCAB_SIZE, is_byte

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training import DEFAULT_CORPUS, log  # noqa: E402

SHAPES = {
    "tiny": EntropyModelConfig(dim=128, n_layers=4, n_heads=4, sliding_window=256),
    "base": EntropyModelConfig(dim=768, n_layers=14, n_heads=12, sliding_window=512),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_rows(corpus: Path, seq_len: int, needed: int) -> torch.Tensor:
    """[N, seq_len] ids, N <= needed: the corpus's documents laid end to end and cut into rows."""
    opener = gzip.open if corpus.suffix == ".gz" else open

    def documents():
        with opener(corpus, "rt", encoding="utf-8") as lines:
            for line in lines:
                yield 0, json.loads(line)["text"].encode("utf-8"), {}

    # pack_rows makes rows of seq_len + 1 ids that overlap by one (inputs and targets, for training);
    # dropping each row's last id tiles the text without overlap.
    rows = [row[:-1] for _, row, _ in itertools.islice(pack_rows(documents(), seq_len, pad_last=False), needed)]
    if not rows:
        raise SystemExit(f"{corpus}: too little text for one row of {seq_len} ids")
    return torch.stack(rows)


def make_batches(rows: torch.Tensor, batch_size: int, count: int, device: torch.device) -> list[torch.Tensor]:
    """`count` batches of consecutive rows, starting over at the first row when the corpus runs out.
    All are moved to the device now so that no host-to-device copy is timed."""
    index = torch.arange(count * batch_size) % len(rows)
    return [rows[i].to(device) for i in index.split(batch_size)]


def synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously: read the clock only once they have finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, inputs: list, device: torch.device) -> tuple[float, list]:
    """Seconds `fn` takes over all the inputs (one call each), and its outputs."""
    seconds, outputs = 0.0, []
    for x in inputs:
        synchronize(device)
        start = time.perf_counter()
        outputs.append(fn(x))
        synchronize(device)
        seconds += time.perf_counter() - start
    return seconds, outputs


def median_threshold(entropies: torch.Tensor) -> float:
    """A threshold about half of `entropies` lie above: their median, or halfway down to the next lower
    value when that is closer to half. Entropies in bf16 take few distinct values, and so many can tie
    at the median that far fewer than half lie strictly above it."""
    h = entropies.flatten().float()
    median = h.median()
    below = h[h < median]
    candidates = [median] + ([(median + below.max()) / 2] if len(below) else [])
    return float(min(candidates, key=lambda t: abs(float((h > t).float().mean()) - 0.5)))


def rate(n_bytes: int, seconds: float) -> dict:
    # Four significant digits: rates span from well under 0.01 MB/s (a big model on a CPU) to thousands.
    return {"seconds": float(f"{seconds:.4g}"), "mb_per_s": float(f"{n_bytes / 1e6 / seconds:.4g}")}


def log_rates(who: str, n_bytes: int, entropy_s: float, boundary_s: float, total_s: float) -> None:
    stages = {"entropy": entropy_s, "boundaries": boundary_s, "total": total_s}
    log(f"  {who}: MB/s " + ", ".join(f"{name} {n_bytes / 1e6 / s:.4g}" for name, s in stages.items()))


def bench_ours(config: EntropyModelConfig, threshold_batch: torch.Tensor, warmup: list[torch.Tensor],
               timed_batches: list[torch.Tensor], n_bytes: int, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)  # the same random weights on every run
    model = EntropyModel(config).eval().to(device=device, dtype=dtype)
    # The model has a sliding window, so the Patcher needs no training context to bound attention.
    threshold = median_threshold(model.entropies(threshold_batch))
    patcher = Patcher(PatchingConfig(mode="entropy", threshold=threshold), model)
    for ids in warmup:
        patcher(ids)
    entropy_s, entropies = timed(patcher.entropies, timed_batches, device)
    boundary_s, patches = timed(lambda pair: patcher(pair[0], entropies=pair[1]),
                                list(zip(timed_batches, entropies)), device)
    total_s, _ = timed(patcher, timed_batches, device)
    log_rates("ours", n_bytes, entropy_s, boundary_s, total_s)
    # Mean patch size over the real (non-padding) positions of all timed rows, not a mean of per-batch means.
    positions = sum(int((ids != PAD).sum()) for ids in timed_batches)
    starts = sum(int((p.starts & (ids != PAD)).sum()) for p, ids in zip(patches, timed_batches))
    return {
        "model": {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
                  "sliding_window": config.sliding_window, "ffn_hidden": config.ffn_hidden,
                  "params": model.num_params()},
        "threshold": round(threshold, 4),
        "bytes": n_bytes,
        "entropy": rate(n_bytes, entropy_s),
        "boundaries": rate(n_bytes, boundary_s),
        "total": rate(n_bytes, total_s),
        "mean_patch_size": round(positions / starts, 4),
    }


def bench_hf(config: EntropyModelConfig, threshold_batch: torch.Tensor, warmup: list[torch.Tensor],
             timed_batches: list[torch.Tensor], n_bytes: int, device: torch.device, dtype: torch.dtype) -> dict:
    """The same measurements for transformers' BltPatcher, with a model of the same shape."""
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers is not installed"}
    try:
        from transformers.models.blt import BltPatcher, BltPatcherConfig
    except ImportError:
        return {"skipped": f"transformers {transformers.__version__} has no BltPatcher"}

    hf_config = BltPatcherConfig(
        vocab_size=VOCAB_SIZE, hidden_size=config.dim, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, intermediate_size=config.ffn_hidden,
        sliding_window=config.sliding_window, rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
    )
    torch.manual_seed(0)
    model = BltPatcher(hf_config).eval().to(device=device, dtype=dtype)

    # forward returns (entropies, patch lengths, logits). Without patch_size it makes no boundary
    # decision (every length is 1): the entropy stage alone. Any patch_size with a threshold turns on
    # thresholding; its value is not otherwise used.
    def entropies(ids):
        return model(ids)[0]

    def patch(ids):
        return model(ids, patch_size=1, threshold=threshold)[1]

    # Its random weights are not ours, so its entropies differ: its own median gives the same semantics.
    threshold = median_threshold(entropies(threshold_batch))
    for ids in warmup:
        patch(ids)
    length = timed_batches[0].shape[1]
    entropy_s, hs = timed(entropies, timed_batches, device)
    boundary_s, lengths = timed(
        lambda h: BltPatcher.patch_lengths_from_entropies(h, length, patch_size=1, threshold=threshold), hs, device)
    total_s, _ = timed(patch, timed_batches, device)
    log_rates("hf", n_bytes, entropy_s, boundary_s, total_s)
    # Rows are padded with zero (or negative) lengths past their last patch: only positive ones are patches.
    patches = sum(int((pl > 0).sum()) for pl in lengths)
    positions = sum(ids.numel() for ids in timed_batches)
    return {
        "transformers": transformers.__version__,
        "attn_implementation": model.config._attn_implementation,
        "params": sum(p.numel() for p in model.parameters()),
        "threshold": round(threshold, 4),
        "entropy": rate(n_bytes, entropy_s),
        "boundaries": rate(n_bytes, boundary_s),
        "total": rate(n_bytes, total_s),
        "mean_patch_size": round(positions / patches, 4),
        "note": ("same shape, rows and bytes; random weights of its own init, so the threshold is the median "
                 "of its own entropies on the first batch. It knows no documents: attention and patches run "
                 "across BOS inside a row (ours restart at every BOS), and its boundary rule is H(t-1) > "
                 "threshold from position 2 of the row on. Its boundary stage makes patch lengths only (ours "
                 "also patch ids per position and a mask); its entropies are in the model dtype (ours "
                 "float32)."),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="bfloat16 on CUDA only")
    parser.add_argument("--shapes", default="tiny,base", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                        help="JSONL (.gz or plain), a 'text' field a line")
    parser.add_argument("--seq_len", type=int, default=1024, help="ids per row")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per batch")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--batches", type=int, default=20, help="timed batches")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shapes = args.shapes.split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        parser.error(f"unknown shapes {unknown}: choose from {list(SHAPES)}")
    if dtype == torch.bfloat16 and device.type != "cuda":
        parser.error("bfloat16 is for CUDA only")
    if min(args.seq_len, args.batch_size, args.batches) < 1 or args.warmup < 0:
        parser.error("seq_len, batch_size and batches must be at least 1, warmup at least 0")

    count = args.warmup + args.batches
    rows = load_rows(args.corpus, args.seq_len, count * args.batch_size)
    batches = make_batches(rows, args.batch_size, count, device)
    warmup, timed_batches = batches[: args.warmup], batches[args.warmup :]
    n_bytes = sum(int(is_byte(ids).sum()) for ids in timed_batches)
    log(f"{len(rows)} rows of {args.seq_len} ids from {args.corpus}; {n_bytes} bytes timed per pass "
        f"on {device} ({args.dtype}, {torch.get_num_threads()} threads)")

    results = {}
    with torch.inference_mode():
        for name in shapes:
            log(f"{name}:")
            ours = bench_ours(SHAPES[name], batches[0], warmup, timed_batches, n_bytes, device, dtype)
            ours["hf_blt_patcher"] = bench_hf(SHAPES[name], batches[0], warmup, timed_batches, n_bytes, device, dtype)
            results[name] = ours

    print(json.dumps({
        "benchmark": "patching (entropy mode, threshold at the first batch's median entropy)",
        "corpus": str(args.corpus),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "batches": args.batches,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shapes": results,
    }, indent=2))


if __name__ == "__main__":
    main()
