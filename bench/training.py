"""Training throughput and peak memory of BLT and its entropy model, beside Hugging Face's BltForCausalLM.

For each shape (rows x bytes a row; default 4x1024 and 1x8192) three models train on rows of real text
(documents of a JSONL corpus, each BOS + bytes + EOS, laid end to end and cut into rows):

- blt:     our ByteLatentTransformer at BLT_48M, with 4-byte static patches (blt_lightning.patching)
- hf_blt:  transformers' BltForCausalLM at the same shape (hf_config), given the same patch lengths
- entropy: our EntropyModel at ENTROPY_SMALL

The two BLTs have the same shape, down to the parameter count the JSON reports for each: widths, layers,
heads (of size 64), SwiGLU widths (768, 1536, 768: BltConfig's defaults differ, so each is set), a sliding
window of 512 bytes in the local models, k = 2, 6 x 20,000 hash n-gram rows, the doubled cross-attention
residual. BltForCausalLM's local masks are dense ([B, 1, L, L] sliding window, [P * k, L] and [L, P * k]
cross-attention); ours run in blocks and gathers (BLTConfig.attention "sdpa"; --attention dense times our
quadratic reference instead).

A step is forward, next-byte cross entropy, backward and a step of fused AdamW (our LightningModules'
optimizer; the same for all), in float32. --warmup steps run untimed, then --steps are timed one by one;
bytes/s is the ids of a batch (B x L, specials included) over a step's seconds. Patches are made before
the clock starts, for both BLTs.

Every (model, shape) runs in a process of its own, --repeats times, so that each has a clean peak memory.
Two measures, both over whole training steps:
- peak_resident_mb: the Linux peak resident set size (VmHWM), reset just before the first step
  (/proc/self/clear_refs) and read after the last; training_peak_mb is that less the resident size just
  before the first step (weights, batch, runtime), i.e. what training adds. This is what the machine
  sees, and includes what glibc's malloc keeps of freed memory (fragmentation).
- peak_malloc_mb: the most bytes malloc reports in use (mallinfo2: heap plus mmapped), read after every
  aten op of one more step: the memory the tensors need, without what the allocator keeps back.

Both BLTs' resident peaks sit well above their malloc peaks on this VM's glibc 2.36 in part because torch
allocates with posix_memalign (64-byte alignment), and glibc's memalign puts the few bytes it splits off a
chunk into malloc's per-thread cache and fast bins, where they never merge with free neighbours (glibc bug
30723, fixed in newer releases). A freed tensor then leaves a hole exactly its own size, which a new tensor of
that size, asking for its size plus the alignment, does not fit.
GLIBC_TUNABLES=glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0 in the environment turns both off and lets
the pieces merge; the workers inherit the environment, and the JSON records it with the C library's version.
--glibc DIR runs the workers on the C library in DIR instead, at its defaults (they still inherit GLIBC_TUNABLES).
DIR holds its dynamic loader and libc.so.6: Debian 13's glibc 2.41, for one, is its libc6 package's
usr/lib/x86_64-linux-gnu, unpacked with dpkg-deb -x.

    python bench/training.py [--shapes 4x1024,1x8192] [--models blt,hf_blt,entropy] [--steps 5] [--repeats 3]
                              [--activation_checkpointing {none,blocks,byte_feed_forward,feed_forward}]
                              [--glibc DIR]

Prints one JSON object on stdout; progress goes to stderr. transformers is optional: without it the
hf_blt entries say so.
"""

import argparse
import ctypes
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from blt_lightning.models import EntropyModel, EntropyModelConfig
from blt_lightning.models.blt import BLTConfig, ByteLatentTransformer
from blt_lightning.models.layers import set_activation_checkpointing
from blt_lightning.patching import PatchingConfig, patch
from blt_lightning.vocab import PAD, VOCAB_SIZE, encode

# 48M parameters: global 4 x 512, encoder 1 x 256, decoder 2 x 256, k = 2, n-grams 3-8 x 20,000 rows.
BLT_48M = BLTConfig(encoder_dim=256, encoder_layers=1, encoder_heads=4, global_dim=512, global_layers=4, global_heads=8,
                    decoder_dim=256, decoder_layers=2, decoder_heads=4, local_window=512, cross_attn_k=2,
                    ngram_sizes=(3, 4, 5, 6, 7, 8), ngram_table_size=20_000,
                    encoder_ffn_hidden=768, global_ffn_hidden=1536, decoder_ffn_hidden=768,
                    doubled_cross_attn_residual=True)  # as BltForCausalLM computes it
ENTROPY_SMALL = EntropyModelConfig(dim=256, n_layers=4, n_heads=4, sliding_window=512)
PATCHING = PatchingConfig(mode="static", patch_size=4)
# The slice of Moby Dick that ships with the repository (data/README.md): a fresh clone runs the benchmarks as is.
DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus" / "en_moby_dick.jsonl.gz"
MODELS = ("blt", "hf_blt", "entropy")
LOADER = "ld-linux-x86-64.so.2"  # glibc's dynamic loader on x86-64, which --glibc runs the workers with


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def hf_config(c: BLTConfig):
    """BltConfig of BltForCausalLM with c's shape; patches come from outside (patch_in_forward off)."""
    from transformers import BltConfig

    rope = {"rope_type": "default", "rope_theta": c.rope_theta}

    def local(dim, layers, heads, hidden, all_layers):
        return {"hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": heads,
                "intermediate_size": hidden, "hidden_size_global": c.global_dim, "cross_attn_k": c.cross_attn_k,
                "cross_attn_all_layers": all_layers, "rms_norm_eps": c.norm_eps, "rope_parameters": rope}

    return BltConfig(
        vocab_size=VOCAB_SIZE, patch_in_forward=False, use_cache=False, rope_parameters=rope,
        cross_attn_k=c.cross_attn_k, local_attention_window_len=c.local_window,
        encoder_hash_byte_group_size=list(c.ngram_sizes), encoder_hash_byte_group_vocab=c.ngram_table_size,
        encoder_hash_byte_group_nb_functions=c.hash_functions,
        encoder_config=local(c.encoder_dim, c.encoder_layers, c.encoder_heads, c.encoder_ffn_hidden,
                             c.encoder_cross_attn_all_layers),
        decoder_config=local(c.decoder_dim, c.decoder_layers, c.decoder_heads, c.decoder_ffn_hidden,
                             c.decoder_cross_attn_all_layers),
        global_config={"hidden_size": c.global_dim, "num_hidden_layers": c.global_layers,
                       "num_attention_heads": c.global_heads, "intermediate_size": c.global_ffn_hidden,
                       "rms_norm_eps": c.norm_eps, "rope_parameters": rope},
    )


def load_rows(corpus: Path, rows: int, length: int) -> torch.Tensor:
    """[rows, length + 1] ids: the corpus's documents end to end, starting over if it runs out."""
    opener = gzip.open if corpus.suffix == ".gz" else open
    with opener(corpus, "rt", encoding="utf-8") as lines:
        ids = torch.cat([encode(json.loads(line)["text"].encode("utf-8")) for line in lines])
    needed = rows * (length + 1)
    return ids.repeat(-(-needed // len(ids)))[:needed].view(rows, length + 1)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset the peak resident set size to the current one (Linux 4.0+)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_peak(step) -> int | None:
    """Most bytes in use by malloc after any aten op of step() (glibc only; None elsewhere)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _Mallinfo2

    class Sample(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args, kwargs=None):
            out = func(*args, **(kwargs or {}))
            info = mallinfo2()
            self.peak = max(self.peak, info.uordblks + info.hblkhd)
            return out

    with Sample() as sample:  # backward ops run in this thread too, so they are sampled
        step()
    return sample.peak


def build(model: str, batches: list[torch.Tensor], attention: str, activation_checkpointing: str = "none"):
    """(module, loss of batch i) for one model; patches are made now, off the clock. activation_checkpointing
    (our models): "blocks" recomputes every transformer block in backward, "byte_feed_forward" the SwiGLU
    hidden of the blocks that run over bytes, "feed_forward" that of every block, as the LightningModules' option
    of that name."""
    cross_entropy = lambda logits, ids: F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=PAD)
    if model == "entropy":
        net = EntropyModel(ENTROPY_SMALL)
        loss_of = lambda i: cross_entropy(net(batches[i][:, :-1]), batches[i])
    else:
        patches = [patch(ids[:, :-1], PATCHING) for ids in batches]
        if model == "hf_blt":
            from transformers import BltForCausalLM

            net = BltForCausalLM(hf_config(BLT_48M))  # its labels= would shift the targets once more: ours are shifted
            logits = lambda i: net(input_ids=batches[i][:, :-1], patch_lengths=patches[i].lengths).logits
            return net, lambda i: cross_entropy(logits(i), batches[i])
        net = ByteLatentTransformer(replace(BLT_48M, attention=attention))
        loss_of = lambda i: cross_entropy(net(batches[i][:, :-1], patches[i]), batches[i])
    set_activation_checkpointing(net, {"none": False, "blocks": True}.get(activation_checkpointing,
                                                                           activation_checkpointing))
    return net, loss_of


def worker(job: dict) -> dict:
    """Train one model at one shape in this process; its speed and memory."""
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    count = job["warmup"] + job["steps"]
    batches = list(load_rows(Path(job["corpus"]), count * job["rows"], job["length"]).split(job["rows"]))
    net, loss_of = build(job["model"], batches, job["attention"], job["activation_checkpointing"])
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    before = resident_bytes()
    reset_peak()
    seconds = []

    def step(i):
        loss = loss_of(i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for i in range(count):
        start = time.perf_counter()
        loss = step(i)
        if i >= job["warmup"]:
            seconds.append(time.perf_counter() - start)
    peak_rss = peak_resident_bytes()
    peak_malloc = malloc_peak(lambda: step(0))
    result = {"params": sum(p.numel() for p in net.parameters()), "step_seconds": [round(s, 3) for s in seconds],
              "resident_before_mb": round(before / 2**20, 1), "peak_resident_mb": round(peak_rss / 2**20, 1),
              "training_peak_mb": round((peak_rss - before) / 2**20, 1),
              "peak_malloc_mb": peak_malloc and round(peak_malloc / 2**20, 1), "final_loss": round(loss, 4)}
    if job["model"] == "hf_blt":
        import transformers

        result.update(transformers=transformers.__version__, attn_implementation=net.config._attn_implementation)
    return {**result, "libc": c_library()}


def c_library() -> str:
    """The C library this process runs on, and its file. (platform.libc_ver() reads the Python executable's file,
    which does not know the library --glibc loads.)"""
    try:
        version = ctypes.CDLL("libc.so.6").gnu_get_libc_version
    except (OSError, AttributeError):
        return " ".join(filter(None, platform.libc_ver())) or "unknown"
    version.restype = ctypes.c_char_p
    with open("/proc/self/maps") as maps:  # libc.so.6, or the libc-2.NN.so it links to before glibc 2.34
        paths = {line.split()[-1] for line in maps if "/" in line}
    files = {p for p in paths if re.fullmatch(r"libc(\.so\.6|-[\d.]+\.so)", p.rsplit("/", 1)[-1])}
    return f"glibc {version().decode()} ({', '.join(sorted(files)) or 'file unknown'})"


def run_worker(job: dict, glibc: Path | None = None) -> dict:
    """worker(job) in a process of its own; with glibc (a folder), on the C library there."""
    loader = []
    if glibc:  # --library-path replaces LD_LIBRARY_PATH, which the loader then ignores: keep what that adds
        library_path = ":".join(filter(None, (str(glibc), os.environ.get("LD_LIBRARY_PATH"))))
        loader = [str(glibc / LOADER), "--library-path", library_path]
    command = [*loader, sys.executable, __file__, "--worker", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout)


MEMORY = ("peak_resident_mb", "training_peak_mb", "peak_malloc_mb")
# The targets for our BLT against BltForCausalLM: ratios of bytes/s (at least) and of peak memory (at most).
TARGETS = {"4x1024": {"throughput": 1.0}, "1x8192": {"throughput": 3.0, "memory": 0.5}}


def summary(runs: list[dict], ids_per_step: int) -> dict:
    """Median over the runs of each run's median step; the best single step; the largest peaks."""
    if any("error" in r for r in runs):
        return {"error": next(r["error"] for r in runs if "error" in r)}
    medians = [statistics.median(r["step_seconds"]) for r in runs]
    kept = {k: v for k, v in runs[0].items() if k not in ("step_seconds", "final_loss", *MEMORY)}
    return {**kept,
            "bytes_per_s": round(ids_per_step / statistics.median(medians)),
            "bytes_per_s_best_step": round(ids_per_step / min(min(r["step_seconds"]) for r in runs)),
            "bytes_per_s_per_run": [round(ids_per_step / m) for m in medians],
            **{k: max(r[k] for r in runs) if runs[0][k] is not None else None for k in MEMORY},
            "final_loss": runs[0]["final_loss"]}


def versus(ours: dict, theirs: dict, targets: dict) -> dict:
    """Our bytes/s and peaks as fractions of Hugging Face's, and the targets for this shape."""
    ratios = {"throughput": round(ours["bytes_per_s"] / theirs["bytes_per_s"], 2)}
    ratios.update({k: round(ours[k] / theirs[k], 3) for k in MEMORY if ours[k] and theirs[k]})
    if targets:
        ratios["targets"] = {"throughput_at_least": targets["throughput"],
                             "throughput_met": ratios["throughput"] >= targets["throughput"]}
        if "memory" in targets:
            ratios["targets"]["memory_at_most"] = targets["memory"]
            ratios["targets"].update({f"{k}_met": ratios[k] <= targets["memory"] for k in MEMORY if k in ratios})
    return ratios


def cpu_name() -> str:
    with open("/proc/cpuinfo") as info:
        return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="4x1024,1x8192", help="comma-separated ROWSxBYTES")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--repeats", type=int, default=1, help="processes per model and shape, taking turns")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, the same for all")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                        help="JSONL (.gz or plain), a 'text' field a line")
    parser.add_argument("--attention", choices=("sdpa", "dense", "flex"), default="sdpa",
                        help="our BLT's attention (dense: the quadratic reference)")
    parser.add_argument("--activation_checkpointing", choices=("none", "blocks", "byte_feed_forward", "feed_forward"),
                        default="none", help="what our models recompute in backward (BltForCausalLM: nothing): whole "
                        "transformer blocks, or the SwiGLU hidden of the blocks over bytes, or of every block")
    parser.add_argument("--glibc", type=Path, help=f"run the workers (every model) on the glibc in this folder (its "
                        f"{LOADER} and libc.so.6) at its defaults, GLIBC_TUNABLES aside")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    models = args.models.split(",")
    if unknown := [m for m in models if m not in MODELS]:
        parser.error(f"unknown models {unknown}: choose from {list(MODELS)}")
    if min(args.steps, args.repeats, args.threads) < 1 or args.warmup < 0:
        parser.error("steps, repeats and threads must be at least 1, warmup at least 0")
    if args.glibc and (missing := [f for f in (LOADER, "libc.so.6") if not (args.glibc / f).is_file()]):
        parser.error(f"--glibc {args.glibc}: no {' or '.join(missing)} there (give the folder that holds both)")
    try:
        import transformers
        from transformers import BltForCausalLM  # noqa: F401
        hf_missing = None
    except ImportError:
        hf_missing = "transformers (with BltForCausalLM) is not installed"

    results = {}
    for shape in args.shapes.split(","):
        rows, length = map(int, shape.split("x"))
        runs = {m: [] for m in models}
        for repeat in range(args.repeats):
            for model in models:
                if model == "hf_blt" and hf_missing:
                    continue
                log(f"{shape} {model} run {repeat + 1}/{args.repeats}")
                job = {"model": model, "rows": rows, "length": length, "warmup": args.warmup, "steps": args.steps,
                       "threads": args.threads, "corpus": str(args.corpus), "attention": args.attention,
                       "activation_checkpointing": args.activation_checkpointing}
                runs[model].append(run_worker(job, args.glibc))
        out = {m: {"skipped": hf_missing} if not runs[m] else summary(runs[m], rows * length) for m in models}
        if all("bytes_per_s" in out.get(m, {}) for m in ("blt", "hf_blt")):
            out["blt_vs_hf"] = versus(out["blt"], out["hf_blt"], TARGETS.get(shape, {}))
        results[shape] = out

    print(json.dumps({
        "benchmark": "training steps (forward, cross entropy, backward, fused AdamW), float32",
        "bytes_per_s": "ids per step (rows x bytes, specials included) / median step seconds; median over runs",
        "memory": "peak_resident_mb: peak resident set size (VmHWM) over the training steps; training_peak_mb: that "
                  "less the resident size before the first step; peak_malloc_mb: most bytes in use by malloc after any "
                  "aten op of one more step (no allocator fragmentation); each the largest over runs",
        "blt_config": asdict(replace(BLT_48M, attention=args.attention)),
        "activation_checkpointing": args.activation_checkpointing,
        "hf_blt": ("BltForCausalLM at the same widths, layers, heads, FFN widths, window, k and n-gram tables, "
                   "given our static patch lengths; its local masks are dense ([B, 1, L, L] sliding window, "
                   "[P * k, L] and [L, P * k] cross-attention), and it knows no documents"),
        "entropy_config": asdict(ENTROPY_SMALL),
        "patching": asdict(PATCHING),
        "corpus": str(args.corpus),
        "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
        "torch": torch.__version__, "transformers": None if hf_missing else transformers.__version__,
        "cpu": cpu_name(),
        "libc": ", ".join(sorted({entry["libc"] for out in results.values() for entry in out.values()
                                  if "libc" in entry}))  # the workers'
                or (f"unknown: no worker finished (--glibc {args.glibc})" if args.glibc else c_library()),
        "malloc_environment": {k: v for k, v in os.environ.items() if k == "GLIBC_TUNABLES" or k.startswith("MALLOC_")},
        "shapes": results,
    }, indent=2))


if __name__ == "__main__":
    main()
