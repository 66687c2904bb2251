"""The argument parser of the tools (prepare, calibrate, evaluate, generate, ...): options spelled out in full,
with underscores or hyphens alike (`--seq_len` or `--seq-len`), as LightningCLI's subcommands take them spelled
out (`--trainer.max_steps`): an abbreviation is an error, not a guess."""

import argparse
import sys


class DefaultsShown(argparse.RawDescriptionHelpFormatter):
    """Help that gives each option's default, where it has one that its help does not already state."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if action.required or default is None or default is False or default == [] or default is argparse.SUPPRESS \
                or "default" in text:
            return text
        shown = " ".join(map(self._shown, default)) if isinstance(default, list) else self._shown(default)
        return f"{text} (default: {shown.replace('%', '%%')})"

    @staticmethod
    def _shown(value) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)


class ToolParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **{"formatter_class": DefaultsShown, **kwargs})

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        # after `--` every argument is a value, as argparse reads them
        end = args.index("--") if "--" in args else len(args)
        return super().parse_known_args([*map(self._spelled, args[:end]), *args[end:]], namespace)

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown option is named before any required option is missed: argparse would
        report a mistyped required option (`--targ`) as the option missing (`--target`)."""
        args = list(sys.argv[1:] if args is None else args)
        end = args.index("--") if "--" in args else len(args)
        known = {option for action in self._actions for option in action.option_strings}
        unknown = [a for a in args[:end] if a.startswith("--") and " " not in a
                   and self._spelled(a).partition("=")[0] not in known]
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return super().parse_args(args, namespace)

    def add_device_argument(self) -> None:
        """--device: where the models run, a device torch has here (default: cuda if there is one)."""
        import torch

        def device(text: str) -> str:
            try:
                found = torch.device(text)
            except RuntimeError as error:
                raise argparse.ArgumentTypeError(f"{text}: not a torch device ({error})") from None
            if found.type == "cuda" and (found.index or 0) >= torch.cuda.device_count():
                raise argparse.ArgumentTypeError(f"{text}: torch sees {torch.cuda.device_count()} CUDA devices here")
            return text

        self.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                          help="default: cuda if there is one")

    def _spelled(self, argument: str) -> str:
        """`--an-option[=value]` as this parser spells the option (`--an_option`), if that is how it knows it.
        An argument with a space is a value (a --text of "--a-b=c d"), as argparse takes it."""
        name, equals, value = argument.partition("=")
        known = {option for action in self._actions for option in action.option_strings}
        if not name.startswith("--") or name in known or " " in argument:
            return argument
        for spelling in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
            if spelling in known:
                return spelling + equals + value
        return argument
