"""`compare`: BLT against its baselines at equal training FLOPs, on any data, in one command.

    blt-lightning compare --data corpus/ --eval other-language.jsonl --budget 1e13 3e13 --output-dir runs/compare

1. The data are prepared into shards once (train / validation / test splits), under --output-dir.
2. Stage one: an entropy model is trained on them (--entropy-config) and its threshold calibrated for a
   mean patch size of --patch-size in the rows the entropy-patched experiments train on (their seq_len).
3. Every experiment of --experiments (configs/experiments/NAME.yaml: a byte-level transformer, static,
   space and entropy patches, BLT without hash n-grams) trains for each --budget of training FLOPs; its
   steps follow from its FLOPs per byte (FlopBudget). The frozen entropy model's FLOPs are not counted.
4. Each is evaluated on the held-out test split and on every --eval file (as `evaluate` does).
5. results.md, results.csv and results.json hold the table (bpb, training FLOPs, inference FLOPs per
   byte, mean patch size, wall time); bpb_vs_flops.png plots bpb against training FLOPs. The runs sit
   side by side in TensorBoard (`tensorboard --logdir OUTPUT_DIR`), each with its hyperparameters.

Runs happen in subprocesses (`python -m blt_lightning fit`), so --config files (configs/trainer/gpu.yaml,
say) apply to every one. A run already in results.json is not run again: rerun the command to go on
after an interruption. A run whose configs (the text of its experiment and --config files) or budget
differ from those its row records is trained again and its row replaced. Stage one is trained again when
its own (--entropy-config, --config, --patch-size, the rows it is calibrated in) change, and then so is
every entropy-patched run. A run kept is evaluated on any --eval file its row lacks.
"""

import csv
import hashlib
import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from .evaluate import evaluate
from .outputs import make_dirs, output_problem, remove_empty, write_atomically
from .prepare import MANIFEST, PrepareOptions, is_prepared, prepare
from .tool_parser import ToolParser

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = ("byte", "static", "space", "entropy", "entropy-no-ngrams")
PREPARE = PrepareOptions(val_fraction=0.05, test_fraction=0.05)


def fit(configs: list[Path | str], overrides: list[str], root: Path, run_name: str) -> tuple[Path, float]:
    """Train one run in a subprocess; its last checkpoint and the wall seconds it took."""
    command = [sys.executable, "-m", "blt_lightning", "fit", *[a for c in configs for a in ("--config", str(c))],
               "--trainer.default_root_dir", str(root), "--run_name", run_name, *overrides]
    print(f"== {run_name}: {' '.join(command[3:])}", flush=True)
    start = time.perf_counter()
    if subprocess.run(command).returncode != 0:
        raise RuntimeError(f"the run {run_name} failed (its output is above; command: {' '.join(command)})")
    from .cli import runs_last_checkpoint  # the CLI imports this module

    return runs_last_checkpoint(root / run_name), time.perf_counter() - start


def row_length(configs: list[Path]) -> int | None:
    """data.init_args.seq_len as the configs compose (the last that sets it wins), None if none does."""
    found = None
    for config in configs:
        data = (yaml.safe_load(Path(config).read_text()) or {}).get("data") or {}
        found = (data.get("init_args") or {}).get("seq_len", found)
    return found


def settings(configs: list[Path], values: list) -> str:
    """A digest of what a run is, besides its data (prepared once, and checked by is_prepared): the text of
    each of its configs, in order, and `values`. No paths: the same folder named another way (out, ./out,
    /abs/out) holds the same runs."""
    digest = hashlib.sha256(json.dumps(values).encode())
    for config in configs:
        digest.update(hashlib.sha256(Path(config).read_bytes()).digest())
    return digest.hexdigest()[:16]


def stage_one(args, manifest: Path, data: list[str], seq_len: int | None) -> tuple[Path, Path, str]:
    """The entropy model's checkpoint, the patching YAML calibrated for it in rows of seq_len (those the
    entropy-patched experiments train on) when given, and what identifies the two (for those experiments'
    settings): those of an earlier run of the same settings (recorded in stage-one.json), else trained and
    calibrated now."""
    from .calibrate import main as calibrate

    out = args.output_dir
    record, patching = out / "stage-one.json", out / f"patching-entropy-{args.patch_size}.yaml"
    configs = [args.entropy_config, *args.config]
    wanted = settings(configs, ["stage one", args.patch_size, seq_len])
    done = json.loads(record.read_text()) if record.is_file() else {}
    if done.get("settings") == wanted and (out / done["checkpoint"]).is_file() and patching.is_file():
        return out / done["checkpoint"], patching, f"{wanted} {done['checkpoint']}"
    if done or (out / "entropy-model").exists():
        why = "its settings changed since" if done else "it was trained by an earlier version, which kept no"
        print(f"== entropy-model: {why} {record}: trained again", flush=True)
    checkpoint, _ = fit(configs, data, out, "entropy-model")
    rows = ["--seq_len", str(seq_len)] if seq_len else []
    calibrate(["--checkpoint", str(checkpoint), "--data", str(manifest), "--target", str(args.patch_size),
               *rows, "--output", str(patching), "--overwrite"])
    relative = str(checkpoint.relative_to(out))
    write_atomically(record, json.dumps({"settings": wanted, "checkpoint": relative}) + "\n")
    return checkpoint, patching, f"{wanted} {relative}"


def label(eval_file: str) -> str:
    """An --eval file's name in the table: its bpb is the column bpb:<label>."""
    return Path(eval_file).name.split(".")[0]


def add_evaluations(row: dict, name: str, eval_files: list[str], out: Path) -> bool:
    """Evaluate a run already in the table on the --eval files its row lacks (added since it was trained);
    whether the row gained any."""
    missing = [f for f in eval_files if f"bpb:{label(f)}" not in row]
    if not missing:
        return False
    if not Path(row["checkpoint"]).is_file():
        print(f"== {name}: its checkpoint {row['checkpoint']} is gone: not evaluated on {' '.join(missing)}",
              flush=True)
        return False
    print(f"== {name}: evaluated on {' '.join(missing)}, which its row lacks", flush=True)
    for f in missing:
        row[f"bpb:{label(f)}"] = evaluate(row["checkpoint"], [f], out / "evaluate", enable_progress_bar=False)["bpb"]
    return True


def table_row(name: str, budget: float, run_settings: str, checkpoint: Path, seconds: float, held_out: dict,
              extra: dict[str, dict]) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    params = sum(v.numel() for k, v in state["state_dict"].items() if not k.startswith("entropy_model."))
    return {"experiment": name, "budget_flops": budget, "training_flops": state.get("trained_flops"),
            "steps": state["global_step"], "params": params, "bpb": held_out["bpb"],
            **{f"bpb:{label}": report["bpb"] for label, report in extra.items()},
            "inference_flops_per_byte": held_out["flops_per_byte"],
            "of_which_entropy_model": held_out.get("entropy_model_flops_per_byte", 0.0),
            "mean_patch_size": held_out.get("mean_patch_size", 1.0), "train_seconds": round(seconds, 1),
            "checkpoint": str(checkpoint), "settings": run_settings}


def write_results(rows: list[dict], out: Path) -> None:
    """The table as JSON (what a rerun reads to go on), CSV and markdown, each written atomically."""
    write_atomically(out / "results.json", json.dumps(rows, indent=2) + "\n")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(out / "results.csv", table.getvalue())
    shown = [c for c in columns if c not in ("checkpoint", "settings")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(cell(c, row.get(c, "")) for c in shown) + " |" for row in rows]
    write_atomically(out / "results.md", "\n".join(lines) + "\n")
    plot(rows, out / "bpb_vs_flops.png")


def cell(column: str, value) -> str:
    """A value of the markdown table: bpb to 4 decimals, FLOPs to 3 digits, seconds whole."""
    if not isinstance(value, float):
        return str(value)
    if column.startswith("bpb"):
        return f"{value:.4f}"
    if column == "mean_patch_size":
        return f"{value:.2f}"
    return f"{value:.0f}" if column == "train_seconds" else f"{value:.3g}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(row["experiment"] for row in rows):
        points = sorted((row["training_flops"], row["bpb"]) for row in rows if row["experiment"] == name)
        axes.plot(*zip(*points), marker="o", label=name)
    axes.set_xscale("log")
    axes.set_xlabel("training FLOPs")
    axes.set_ylabel("held-out bits per byte")
    axes.set_title("bpb against training FLOPs")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser(prog="blt-lightning compare", description=__doc__.split("\n\n")[0],
                        epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--data", nargs="+", default=["data/corpus"],
                        help="text, JSON-lines files or directories to train and hold out from")
    parser.add_argument("--eval", nargs="*", default=[], help="extra files every model is evaluated on")
    parser.add_argument("--budget", type=float, nargs="+", default=[1e13], help="training FLOPs per run")
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS),
                        help="names in configs/experiments/, or YAML paths")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/compare"),
                        help="where the shards, runs, table and plots go")
    parser.add_argument("--patch-size", type=float, default=4.5,
                        help="mean patch size the entropy threshold is calibrated for")
    parser.add_argument("--entropy-config", type=Path, default=CONFIGS / "entropy/tiny.yaml", help="stage one's config")
    parser.add_argument("--config", type=Path, nargs="*", default=[],
                        help="more configs for every run (a trainer YAML)")
    args = parser.parse_args(argv)
    experiments = [Path(e) if e.endswith(".yaml") else CONFIGS / "experiments" / f"{e}.yaml" for e in args.experiments]
    if missing := [str(e) for e in experiments if not e.is_file()]:  # before any work
        parser.error(f"no experiment config {missing}")
    if missing := [str(c) for c in (args.entropy_config, *args.config) if not c.is_file()]:
        parser.error(f"no such config {missing} (--entropy-config, --config)")
    if missing := [f for f in args.eval if not Path(f).is_file()]:  # before training, which they would follow
        parser.error(f"no --eval file {missing}")
    if len({label(f) for f in args.eval}) < len(args.eval):
        parser.error(f"--eval files whose names share a column of the table (bpb:NAME, NAME before the first "
                     f"dot): {[label(f) for f in args.eval]}; rename one")
    if not all(0 < budget < math.inf for budget in args.budget):
        parser.error("each --budget must be a positive number of FLOPs")

    out = args.output_dir
    if problem := output_problem(out, folder=True):
        parser.error(problem)
    made = make_dirs(out)
    manifest = out / "shards" / MANIFEST
    if not manifest.is_file():
        try:
            prepare(args.data, manifest.parent, PREPARE)
        except BaseException:
            remove_empty(made)  # a new --output-dir goes again, as after a usage error
            raise
        print(f"prepared {args.data} under {manifest.parent}", flush=True)
    elif not is_prepared(manifest, args.data, PREPARE):  # its runs and results are of other data
        parser.error(f"{out} holds a comparison of other data than --data {' '.join(args.data)} (as the files are "
                     f"now; see {manifest}): give another --output-dir")
    data = ["--data.init_args.sources", "null", "--data.init_args.manifest", str(manifest)]

    needs_entropy = [e for e in experiments if "mode: entropy" in e.read_text()]
    entropy_checkpoint, patching, entropy_model = (stage_one(args, manifest, data,
                                                             row_length([needs_entropy[0], *args.config]))
                                                   if needs_entropy else (None, None, None))

    rows = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else []
    for budget in args.budget:
        for experiment in experiments:
            name = f"{experiment.stem}-{budget:.0e}"
            configs = [experiment, *args.config]
            overrides = data + ["--model.init_args.flops_budget", str(budget)]
            run_settings = settings(configs, [budget, entropy_model if experiment in needs_entropy else None])
            if experiment in needs_entropy:
                configs.append(patching)
                overrides += ["--model.init_args.entropy_checkpoint", str(entropy_checkpoint)]
            place = next((i for i, row in enumerate(rows)
                          if row["experiment"] == experiment.stem and row["budget_flops"] == budget), None)
            if place is not None and rows[place].get("settings") == run_settings:
                if add_evaluations(rows[place], name, args.eval, out):
                    write_results(rows, out)
                continue
            if place is not None:
                why = ("its configs or entropy model changed since its row in" if "settings" in rows[place]
                       else "its row was written by an earlier version, which kept no settings, in")
                print(f"== {name}: {why} {out / 'results.json'}: trained again", flush=True)
            checkpoint, seconds = fit(configs, overrides, out, name)
            held_out = evaluate(str(checkpoint), [str(manifest)], out / "evaluate", enable_progress_bar=False)
            extra = {label(f): evaluate(str(checkpoint), [f], out / "evaluate", enable_progress_bar=False)
                     for f in args.eval}
            row = table_row(experiment.stem, budget, run_settings, checkpoint, seconds, held_out, extra)
            if place is None:
                rows.append(row)
            else:
                rows[place] = row  # in its place: the table keeps its order
            write_results(rows, out)  # after every run: an interrupted comparison keeps what it finished
    write_results(rows, out)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.json'}, {out / 'bpb_vs_flops.png'}; "
          f"tensorboard --logdir {out}")
