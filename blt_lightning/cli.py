"""The command line: LightningCLI for fit/validate/test/predict, plus the project's own tools.

`blt-lightning fit --config configs/entropy/tiny.yaml` trains; any value can be overridden
(`--trainer.max_steps 100`), several `--config` files compose, `--print_config` shows the result.
The model and the DataModule are chosen by class path in the YAML (subclass mode), so one CLI serves
every stage; the data's `seq_len` is linked into the model rather than repeated.
"""

import difflib
import functools
import os
import re
import signal
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import jsonargparse
import torch
import yaml
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from . import calibrate, compare, evaluate, generate, hf_export, hf_import, prepare, store_entropies, visualize
from .callbacks import slurm_job_id
from .errors import Diverged, InputError
from .patcher import CARRIED_ENTROPY_MODEL

# Attribute docstrings of config dataclasses become the CLI's help.
jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
# Our streams define __len__ exactly (each worker reads its own shards and knows its share), and a
# prediction is saved per batch and rank, not by sample index.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
warnings.filterwarnings("ignore", message="Couldn't infer the batch indices fetched from your dataloader")

EVALUATIONS = ("validate", "test", "predict")
TOOLS = {
    "prepare": prepare.main,
    "entropies": store_entropies.main,
    "calibrate": calibrate.main,
    "patch": visualize.main,
    "evaluate": evaluate.main,
    "compare": compare.main,
    "generate": generate.main,
    "import-hf": hf_import.main,
    "export-hf": hf_export.main,
}


class SaveConfigPerAttempt(SaveConfigCallback):
    """Each attempt of a run writes its config: config.yaml, then config.resume-1.yaml, ... as the run is
    resumed into its folder (Lightning's callback would refuse to overwrite config.yaml)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        log_dir = trainer.log_dir  # on every rank: it broadcasts
        if not self.already_saved and log_dir is not None:  # only rank zero's name is used
            existing = len(list(Path(log_dir).glob("config*.yaml")))
            self.config_filename = f"config.resume-{existing}.yaml" if existing else "config.yaml"
        super().setup(trainer, pl_module, stage)


# The model's row length is the data's (BLTLightningCLI links them); jsonargparse would put the link's value over
# one given for the model without a word.
SEQ_LEN_SOURCE, SEQ_LEN_TARGETS = "data.init_args.seq_len", ("model.init_args.seq_len", "model.seq_len")
SEQ_LEN_SOURCES = (SEQ_LEN_SOURCE, "data.seq_len")  # as a YAML file may give it


class SpelledOutArgumentParser(LightningArgumentParser):
    """A misspelled option is an error, not the option it begins (--trainer.max_step taken for max_steps). The
    parsers jsonargparse makes for a model's nested options are of the root parser's class, so they refuse too.
    An option it does not know is named with the --config file that sets it."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)
        self._arguments: list[str] = []

    def parse_args(self, args=None, *more, **kwargs):
        self._arguments = list(sys.argv[1:] if args is None else args)
        parsed = super().parse_args(args, *more, **kwargs)
        if (data_seq_len := parsed.get(SEQ_LEN_SOURCE)) is not None:  # a subcommand's options
            self._check_the_linked_seq_len(data_seq_len)
        return parsed

    def _check_the_linked_seq_len(self, data_seq_len: int) -> None:
        """A model seq_len given on the command line must be the data's; one in a --config file must be that
        file's data seq_len if it has one (a run's saved config.yaml has both), else the data's."""
        flags = tuple(f"--{key}" for key in SEQ_LEN_TARGETS)
        given = [("on the command line", value, data_seq_len) for value in option_values(self._arguments, flags)]
        for path in config_files(self._arguments):
            tree, _ = load_yaml(path)
            own = next((v for key in SEQ_LEN_SOURCES if (v := _yaml_value(tree, key)) is not None), None)
            given += [(f"in {path}", value, data_seq_len if own is None else own)
                      for key in SEQ_LEN_TARGETS if (value := _yaml_value(tree, key)) is not None]
        for where, value, expected in given:
            if str(value) != str(expected):
                self.error(f"model seq_len {value} ({where}) is linked from the data's seq_len, {expected}: set "
                           "that instead (--data.seq_len, or data.init_args.seq_len in YAML)")

    def error(self, message: str, ex: Exception | None = None):
        """jsonargparse names neither a --config file that is not YAML nor the one that sets an option it does not
        know: add which."""
        trees = {str(f): load_yaml(f) for f in config_files(self._arguments)}
        for path, (_, problem) in trees.items():
            if problem is not None:
                message += f"\n{path} is not valid YAML: {problem}"
        keys = {path: yaml_keys(tree) for path, (tree, _) in trees.items()}
        for option in dict.fromkeys(re.findall(r"option '([^']+)'", message)):
            files = [f for f, held in keys.items() if any(k == option or k.endswith("." + option) for k in held)]
            if files:
                message += f"\n'{option}' is set in {' and '.join(files)}"
        super().error(message, ex)


def option_values(arguments: list[str], flags: tuple[str, ...]) -> list[str]:
    """The values command-line arguments give any of flags: `--flag value`, or `--flag=value` for a long one."""
    values = [value for flag, value in zip(arguments, arguments[1:]) if flag in flags]
    return values + [a.split("=", 1)[1] for a in arguments
                     if a.startswith("--") and "=" in a and a.split("=", 1)[0] in flags]


def config_files(arguments: list[str]) -> list[Path]:
    """The files --config (or -c) names among command-line arguments (it also takes YAML text)."""
    return [Path(n) for n in option_values(arguments, ("--config", "-c")) if _is_file(n)]


def _is_file(name: str) -> bool:
    """Whether name is a file; False for YAML text given in its place, however long (ENAMETOOLONG raises)."""
    try:
        return Path(name).is_file()
    except (OSError, ValueError):
        return False


def load_yaml(path: Path) -> tuple[object, str | None]:
    """A YAML file's tree, and why it does not load (None: it loads)."""
    try:
        return yaml.safe_load(path.read_text()), None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        return None, f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}" if mark else str(error)
    except (OSError, yaml.YAMLError) as error:
        return None, str(error)


def _yaml_value(tree: object, key: str) -> object:
    """The value at a dotted key of a YAML tree; None where there is none."""
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def yaml_keys(tree: object) -> set[str]:
    """Every key of a YAML tree, dotted from the top (trainer.max_steps)."""

    def walk(node, prefix: str) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield f"{prefix}{key}"
                yield from walk(value, f"{prefix}{key}.")
        elif isinstance(node, list):
            for item in node:
                yield from walk(item, prefix)

    return set(walk(tree, ""))


class BLTLightningCLI(LightningCLI):
    """Lightning's CLI with SpelledOutArgumentParser, the model's seq_len linked from the data's, a run name and
    folder (a SLURM job's named by its id), and --ckpt_path files checked against the stage (a stage-two model is
    built with the entropy model its checkpoint carries)."""

    def __init__(self, *args, parser_class: type[LightningArgumentParser] = SpelledOutArgumentParser, **kwargs):
        super().__init__(*args, parser_class=parser_class, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", default="run",
                            help="Name of the TensorBoard run (and its folder) under default_root_dir.")
        parser.link_arguments(SEQ_LEN_SOURCE, SEQ_LEN_TARGETS[0])

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model's options with those saved in a --ckpt_path file. A file that does not
        load, or holds the other stage's model, ends the command with a message (check_stage); otherwise warn of
        each option that changes, which a `--model...` override or the config set to something else, rather than
        drop it silently."""
        subcommand = self.config.get("subcommand")
        given = self.config[subcommand].get("model") if subcommand else None
        if subcommand in EVALUATIONS and self.config[subcommand].get("ckpt_path") == "last" \
                and self._checkpoints_in_run_folders(subcommand):
            self.config[subcommand].ckpt_path = self._runs_last_checkpoint(subcommand)
        if given is not None:
            check_stage(subcommand, self.config[subcommand].get("ckpt_path"), given.get("class_path"))
        super()._parse_ckpt_path()
        if given is None:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if subcommand == "fit" and ckpt_path == "last" and self._checkpoints_in_run_folders(subcommand) \
                and not SLURMEnvironment.detect():  # the file instantiate_trainer will find for fit() to resume
            ckpt_path = runs_last_checkpoint(self._run_folder(subcommand))
        carried = self._patch_with_the_carried_entropy_model(subcommand, ckpt_path)
        changed = [change for change in option_changes(given.as_dict(), self.config[subcommand].model.as_dict())
                   if not (carried and change.startswith("model.init_args.entropy_checkpoint:"))]
        if changed:
            rank_zero_warn(f"{subcommand}: --ckpt_path {self.config[subcommand].ckpt_path} restores the model options "
                           "it was saved with, in place of the config's: " + "; ".join(changed))

    def _patch_with_the_carried_entropy_model(self, subcommand: str, ckpt_path: str | Path | None) -> bool:
        """A stage-two checkpoint file carries the entropy model that patched its training: evaluating or resuming
        it patches with that one, not with whatever the path its options name holds now (moved, retrained, or on
        another machine). Whether it does."""
        init_args = self.config[subcommand].model.get("init_args")
        if not (init_args and init_args.get("entropy_checkpoint") and ckpt_path and Path(ckpt_path).is_file()):
            return False
        if not checkpoint_header(str(ckpt_path)).carries_entropy_model:
            return False
        init_args.entropy_checkpoint = str(ckpt_path)
        rank_zero_info(f"{subcommand}: patching with the entropy model {ckpt_path} carries")
        return True

    def _checkpoints_in_run_folders(self, subcommand: str) -> bool:
        """Whether the run keeps its checkpoints where instantiate_trainer puts them: no logger of the config's own,
        no checkpoint callback with a dirpath (where Lightning's `last` finds them itself)."""
        trainer = self.config[subcommand].trainer
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        return trainer.get("logger") is None and not any(c.get("init_args", {}).get("dirpath")
                                                         for c in callbacks if isinstance(c, jsonargparse.Namespace))

    def _run_folder(self, subcommand: str) -> Path:
        """default_root_dir/run_name: where instantiate_trainer's logger keeps the run's version folders."""
        config = self.config[subcommand]
        return Path(config.trainer.default_root_dir or ".") / config.run_name

    def _runs_last_checkpoint(self, subcommand: str) -> str:
        """What `--ckpt_path last` evaluates: the run's newest last.ckpt, as `fit --ckpt_path last` resumes it.
        (Lightning would look in the folder of this command's new version, find none and evaluate the model
        untrained, with a warning.)"""
        run = self._run_folder(subcommand)
        last = runs_last_checkpoint(run)
        if last is None:
            sys.exit(f"{subcommand}: --ckpt_path last: no version of the run {run} holds checkpoints/last.ckpt "
                     "(set --trainer.default_root_dir and --run_name as the fit did, or give a checkpoint's path)")
        return str(last)

    def instantiate_classes(self) -> None:
        """A config the constructors refuse (an entropy mode without entropy_checkpoint, a checkpoint that is
        missing or of the wrong stage) ends with their own message, not under jsonargparse's error and its
        dump of the whole resolved config."""
        try:
            super().instantiate_classes()
        except (ValueError, OSError) as error:
            while error.__cause__ is not None:
                error = error.__cause__
            sys.exit(f"{self.subcommand or 'blt-lightning'}: {error}")

    def instantiate_trainer(self, **kwargs):
        self.slurm_run_dir = self.last_checkpoint = None
        # Unless a logger is configured, log to TensorBoard under default_root_dir, so that every output of
        # a run (shards, checkpoints, config.yaml, events) lives under the one directory the user chose.
        if self._get(self.config_init, "trainer", default={}).get("logger") is None:
            root = self._get(self.config, "trainer.default_root_dir") or "."
            name = self._get(self.config, "run_name")
            # `fit --ckpt_path last` continues the run it resumes: same folder, so its last.ckpt is found.
            resuming = self.subcommand == "fit" and self._get(self.config, "ckpt_path") == "last"
            resumed = runs_last_checkpoint(Path(root) / name) if resuming else None
            version = resumed.parents[1].name if resumed is not None else None
            self.last_checkpoint = str(resumed) if resumed is not None else None
            # A fit under SLURM is its job's run, named by the job id, which a requeued job keeps.
            slurm = self.subcommand == "fit" and SLURMEnvironment.detect()
            if slurm and version is None:
                version = f"slurm-{slurm_job_id()}"
            kwargs["logger"] = logger = TensorBoardLogger(root, name=name, version=version, default_hp_metric=False)
            if slurm:
                # Lightning resumes any SLURM job from the newest hpc_ckpt_N.ckpt in default_root_dir (its own
                # SIGUSR1 handler saves them there, where CheckpointOnTerminate is not in the callbacks): in the
                # run's folder, a new job never takes another run's. Shards stay where they were.
                if getattr(self.datamodule, "shard_dir", "") is None:
                    self.datamodule.shard_dir = str(Path(root) / "shards")
                kwargs["default_root_dir"] = self.slurm_run_dir = logger.log_dir
        return super().instantiate_trainer(**kwargs)

    def fit(self, model, datamodule=None, ckpt_path=None, **kwargs) -> None:
        """trainer.fit; a requeued SLURM job resumes from the newest checkpoint in its run's folder: last.ckpt
        (which Lightning alone would not take: CheckpointOnTerminate saves it on SIGUSR1 and SIGTERM) or an
        hpc_ckpt_N.ckpt (Lightning's SIGUSR1 handler, without that callback). The checkpoint that resumes a run
        (`--ckpt_path last`, or a requeued job's) is checked as a named one is: one that does not load ends the
        command with a message naming it."""
        resumed = None
        if self.slurm_run_dir is not None and ckpt_path in (None, "last"):
            resumed = newest_checkpoint(Path(self.slurm_run_dir))
        elif ckpt_path == "last":
            resumed = self.last_checkpoint
        if resumed is not None:
            check_stage("fit", resumed, type(model).__name__)
            ckpt_path = resumed
        elif ckpt_path == "last" and self._checkpoints_in_run_folders("fit"):  # a run's first start (torchrun, SLURM)
            rank_zero_info("--ckpt_path last: the run has no last.ckpt yet, so it starts afresh")
            ckpt_path = None  # Lightning would say the same, advising the save_last that LastCheckpoint replaces
        if torchrun_restarts_share_its_store():
            rank_zero_warn("torchrun --max-restarts shares its rendezvous store with the ranks, so ranks it restarts "
                           "may not connect (they can read the last attempt's addresses: PyTorch issue #135712): "
                           "start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment and "
                           "--standalone (one node) or --rdzv-backend c10d (a static rendezvous, --master_addr, "
                           "shares it anyway)")
        self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)


def torchrun_restarts_share_its_store() -> bool:
    """Whether torchrun, given --max-restarts, shares its rendezvous store with the ranks it starts (its default,
    and always so under a static rendezvous). Ranks it restarts may then connect to the addresses the ranks before
    them published there: with torch 2.13 and gloo most restarts failed ('Gloo connectFullMesh failed ...
    Connection refused') or hung."""
    return (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def check_stage(subcommand: str, ckpt_path: str | None, model_class: str | None) -> None:
    """Exit with a message, not a traceback or a dump of the config, when a --ckpt_path file does not load or
    holds the other stage's model (whose options would not parse as the config's model's). Names Lightning takes
    (last, best, hpc, registry) and URLs are left to it."""
    if not ckpt_path or ckpt_path in ("last", "best", "hpc") or "://" in ckpt_path \
            or ckpt_path.lower() == "registry" or ckpt_path.lower().startswith("registry:"):
        return
    if not Path(ckpt_path).is_file():
        problem = "a folder; give the checkpoint file in it" if Path(ckpt_path).is_dir() else "no such file"
        sys.exit(f"{subcommand}: --ckpt_path {ckpt_path}: {problem}")
    try:
        if not zipfile.is_zipfile(ckpt_path):
            raise ValueError("not a zip archive, as torch.save writes")
        saved = checkpoint_header(ckpt_path).hyper_parameters
    except Exception as error:  # not a torch file, truncated, or not a dict
        sys.exit(f"{subcommand}: {ckpt_path}: not a checkpoint of `blt-lightning fit`: it does not load ({error})")
    saved_class = str(saved.get("_class_path", "")).rsplit(".", 1)[-1]
    if model_class and saved_class and saved_class != model_class.rsplit(".", 1)[-1]:
        sys.exit(f"{subcommand}: {ckpt_path}: its model is {saved_class} and the config's is "
                 f"{model_class.rsplit('.', 1)[-1]}: give the config of the checkpoint's stage")


class CheckpointHeader(NamedTuple):
    hyper_parameters: dict
    carries_entropy_model: bool


def checkpoint_header(ckpt_path: str) -> CheckpointHeader:
    """What the CLI reads of a checkpoint file before Lightning loads it: read once (check_stage, then the carried
    entropy model), and again only if the file changed since."""
    stat = Path(ckpt_path).stat()
    return _checkpoint_header(ckpt_path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _checkpoint_header(ckpt_path: str, modified_ns: int, size: int) -> CheckpointHeader:
    # mmap: only what is read of a large checkpoint comes off the disk; no tensor of it is kept
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    return CheckpointHeader(saved.get("hyper_parameters", {}), CARRIED_ENTROPY_MODEL in saved)


def option_changes(given: dict, restored: dict, prefix: str = "model.") -> list[str]:
    """'name: given -> restored' for each (nested, dotted) option whose value differs."""
    changes = []
    for name in given.keys() | restored.keys():
        before, after = given.get(name), restored.get(name)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += option_changes(before, after, f"{prefix}{name}.")
        elif before != after:
            changes.append(f"{prefix}{name}: {before} -> {after}")
    return sorted(changes)


def newest_checkpoint(run_dir: Path) -> str | None:
    """The newest of a run folder's hpc_ckpt_N.ckpt and checkpoints/last.ckpt (None: neither exists)."""
    found = [*run_dir.glob("hpc_ckpt_*.ckpt"), *(run_dir / "checkpoints").glob("last.ckpt")]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


def runs_last_checkpoint(run: Path) -> Path | None:
    """The newest checkpoints/last.ckpt of a run's version folders (version_N, or slurm-JOB); None: there is none."""
    found = sorted(run.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> None:
    """Run a tool or a LightningCLI subcommand (argv: the arguments, else the command line's). A run SIGTERM
    stopped (after saving last.ckpt) exits with 143, as a process the signal ended does: Lightning ends it with
    status 0, which tells a scheduler, a restart policy or `torchrun --max-restarts` that the run finished."""
    try:
        run(argv)
    except SIGTERMException:
        sys.exit(128 + signal.SIGTERM)
    except BrokenPipeError:  # what reads the output went away (`generate ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would raise again
        sys.exit(1)
    except MisconfigurationException as error:  # Lightning's refusal of Trainer settings: the message says which
        hint = "" if torch.cuda.is_available() or "gpu" not in str(error).lower() else \
            " (this machine has no GPU: --trainer.accelerator cpu)"
        sys.exit(f"blt-lightning: Lightning: {error}{hint}")
    except (InputError, Diverged) as error:  # bad input, named, or a run gone non-finite: its message, not frames
        message = str(error).strip()
        if "Traceback (most recent call last)" in message:  # from a DataLoader worker: its error's line is the last
            message = message.splitlines()[-1].split(f"{type(error).__name__}: ", 1)[-1]
        sys.exit(f"blt-lightning: {message}")


def run(argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in TOOLS:
        return TOOLS[args[0]](args[1:])
    if not args or not (args[0].startswith("-") or args[0] in ("fit", *EVALUATIONS)):  # LightningCLI's list lacks ours
        commands = ["fit", *EVALUATIONS, *TOOLS]
        near = difflib.get_close_matches(args[0], commands, n=1) if args else []
        sys.exit(f"blt-lightning: {f'no command {args[0]!r}' if args else 'give a command'}"
                 f"{f' (did you mean {near[0]}?)' if near else ''}; the commands are {', '.join(commands)} "
                 "(see `blt-lightning COMMAND --help`)")
    BLTLightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_callback=SaveConfigPerAttempt,
        auto_configure_optimizers=False,  # the models' own optimizer options (AdamW, its schedule) are the only ones
        args=argv,
        parser_kwargs={"prog": "blt-lightning",
                       "epilog": "Other commands: " + ", ".join(f"{name} (see `{name} --help`)" for name in TOOLS)},
    )
