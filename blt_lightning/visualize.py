"""Seeing patches: text with its patch boundaries marked, patch-size statistics, and the paper's figure
(the entropy of each byte given the bytes before it, the threshold, and where patches start).
`patch_figure` is also what stage two logs to TensorBoard."""

import argparse
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import torch
import yaml
from matplotlib.figure import Figure

from .outputs import output_problem
from .patcher import entropy_window, load_entropy_model
from .patching import Patches, PatchingConfig, patch
from .tool_parser import ToolParser
from .vocab import OFFSET, decode, encode

MARK = "|"
# Fonts matplotlib ships lack CJK glyphs: such labels draw as boxes, which needs no warning per glyph.
warnings.filterwarnings("ignore", message="Glyph .* missing from font")


def mark_patches(ids: torch.Tensor, starts: torch.Tensor) -> str:
    """The text with MARK before each patch. A patch that starts inside a multi-byte character is marked
    before that character, so the text stays readable; bytes that are not UTF-8 show as escapes."""
    is_byte = ids >= OFFSET
    data = decode(ids)
    cuts = set()
    for i in starts[is_byte].nonzero().flatten().tolist():
        while i > 0 and 0x80 <= data[i] < 0xC0:  # a continuation byte: go back to its character's start
            i -= 1
        cuts.add(i)
    edges = sorted(cuts | {0, len(data)})
    return MARK.join(data[a:b].decode("utf-8", "backslashreplace") for a, b in zip(edges, edges[1:]))


def patch_statistics(patches: Patches) -> dict:
    """The sizes in bytes of the patches that hold bytes, as the mean patch size counts them: BOS's patch
    and the EOS at the end are not bytes of the text."""
    sizes = patches.byte_lengths[patches.byte_lengths > 0].float()
    return {
        "patches": int(sizes.numel()),
        "mean": patches.mean_size,
        "median": float(sizes.median()),
        "p90": float(sizes.quantile(0.9)),
        "max": int(sizes.max()),
    }


def byte_labels(data: bytes) -> list[str]:
    """A label per byte: the character a byte begins, "·" for the rest of a multi-byte character."""
    labels, i = [], 0
    while i < len(data):
        width = next((w for w in (1, 2, 3, 4) if _decodes(data[i : i + w])), 1)
        char = data[i : i + width].decode("utf-8", "replace") if width > 1 or data[i] < 0x80 else f"\\x{data[i]:02x}"
        labels += [{" ": "␣", "\n": "↵", "\t": "⇥"}.get(char, char)] + ["·"] * (width - 1)
        i += width
    return labels


def _decodes(chunk: bytes) -> bool:
    try:
        chunk.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def patch_figure(ids: torch.Tensor, entropies: torch.Tensor, starts: torch.Tensor, threshold: float | None,
                 title: str = "") -> Figure:
    """The paper's figure for one document's ids [L]: above each byte, the entropy of predicting it
    (H at the position before); a dashed line at the threshold; a red line where a patch starts."""
    is_byte = ids >= OFFSET
    data = decode(ids)
    surprise = torch.cat([entropies.new_zeros(1), entropies[:-1]])[is_byte].cpu()  # H(t-1) for byte t
    patch_start = starts[is_byte].cpu()
    n = len(data)
    figure = Figure(figsize=(max(6.0, 0.16 * n), 3.2), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(range(n), surprise.tolist(), marker="o", markersize=2.5, linewidth=1)
    for x in patch_start.nonzero().flatten().tolist():
        axes.axvline(x - 0.5, color="tab:red", linewidth=0.8, alpha=0.7)
    if threshold is not None:
        axes.axhline(threshold, color="gray", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
        axes.legend(loc="upper right", fontsize=8)
    axes.set_xticks(range(n), byte_labels(data), fontsize=7, family="monospace")
    axes.set_xlim(-0.5, n - 0.5)
    axes.set_ylabel("entropy of next byte (nats)")
    axes.set_title(title, fontsize=9)
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser(prog="blt-lightning patch", description="Show how a text is cut into patches.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to patch")
    source.add_argument("--file", help="a file whose bytes to patch")
    parser.add_argument("--checkpoint", help="stage-one (entropy model) checkpoint: needed by the entropy modes")
    parser.add_argument("--patching", help="a YAML snippet written by `calibrate` (or any stage-two config)")
    parser.add_argument("--mode", choices=["entropy", "monotonic", "combined", "static", "space", "byte"])
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--relative_threshold", type=float)
    parser.add_argument("--patch_size", type=int)
    parser.add_argument("--max_patch_length", type=int)
    parser.add_argument("--plot", help="also draw the entropy figure to this image file (PNG, SVG, PDF)")
    parser.add_argument("--plot_bytes", type=int, default=160, help="bytes shown in the figure (default: 160)")
    parser.add_device_argument()
    args = parser.parse_args(argv)
    if args.plot and (problem := output_problem(args.plot)):
        parser.error(problem)
    if args.plot_bytes < 1:
        parser.error("--plot_bytes must be at least 1")
    try:
        config = patching_config(args)
        data = os.fsencode(args.text) if args.text is not None else Path(args.file).read_bytes()  # bytes as given
        if not data:
            raise ValueError(f"{args.file or 'the text'} is empty: no bytes to patch")
        if config.needs_entropies and not args.checkpoint:
            raise ValueError(f"{config.mode} patching needs --checkpoint (an entropy model)")
        ids = encode(data)
        entropies = None
        if args.checkpoint:
            model, context = load_entropy_model(args.checkpoint, args.device)
            entropies = model.document_entropies(ids.to(args.device), entropy_window(model.config, context)).cpu()
        patches = patch(ids[None], config, entropies[None] if entropies is not None else None)
    except (ValueError, OSError) as error:
        sys.exit(f"patch: {error}")
    starts = patches.starts[0]
    print(mark_patches(ids, starts))
    stats = patch_statistics(patches)
    print(f"\n{stats['patches']} patches over {len(data):,} bytes: mean {stats['mean']:.2f}, median "
          f"{stats['median']:.0f}, 90th percentile {stats['p90']:.0f}, longest {stats['max']}")
    if args.plot:
        if entropies is None:
            sys.exit("patch: --plot draws entropies: give --checkpoint")
        shown = args.plot_bytes + 1  # BOS first
        title = f"{config.mode} patching, mean patch size {stats['mean']:.2f}"
        try:
            patch_figure(ids[:shown], entropies[:shown], starts[:shown], config.threshold,
                         title).savefig(args.plot, dpi=150)
        except (ValueError, OSError) as error:  # an image format matplotlib does not write, or no such folder
            sys.exit(f"patch: {args.plot}: {error}")
        print(f"figure: {args.plot}")


def patching_config(args: argparse.Namespace) -> PatchingConfig:
    """A PatchingConfig from a YAML snippet (model.init_args.patching) with command-line values on top."""
    values = {}
    if args.patching:
        try:
            loaded = yaml.safe_load(Path(args.patching).read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{args.patching}: not YAML ({error})") from None
        values = loaded
        for key in ("model", "init_args", "patching"):
            values = values.get(key) if isinstance(values, dict) else None
        if not isinstance(values, dict) or not values:
            raise ValueError(f"{args.patching}: no model.init_args.patching section (a mapping of its options)")
        if unknown := sorted(set(values) - {f.name for f in fields(PatchingConfig)}):
            raise ValueError(f"{args.patching}: model.init_args.patching has no option {', '.join(unknown)}")
    for key in ("mode", "threshold", "relative_threshold", "patch_size", "max_patch_length"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return PatchingConfig(**values)
