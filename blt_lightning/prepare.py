"""`prepare`: text files, directories and JSON-lines into webdataset shards plus a manifest.

One tar sample per document: `<key>.bin` holds the document's raw bytes (never decoded, so invalid
UTF-8 survives), `<key>.json` its `source` and `lang`. Each document goes to a split by a hash of its
bytes, so the split is the same on every run and a duplicated document never straddles two splits. A
document cut into pieces for length is split piece by piece: a corpus that is one large file still gets
every split (its neighbouring pieces may then sit in train and test).
Within a split, documents are spread by hash over `interleave` shards written side by side, so every
shard mixes many inputs even though inputs are read one after another.

Shards are written under temporary names and take their own (and the manifest its place) only once
all are written: a run that fails leaves the output directory as it found it. Tar headers carry no time
or owner, so the same inputs give byte-identical shards.
"""

import glob
import gzip
import hashlib
import io
import json
import os
import re
import sys
import zlib
from collections.abc import Iterator
from typing import BinaryIO
from dataclasses import asdict, dataclass, field
from pathlib import Path

import webdataset as wds

from .errors import BadInput, MissingInput, read_json_object
from .outputs import byte_progress, check_output_dir, make_dirs, remove_empty, write_atomically
from .tool_parser import ToolParser

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "blt_lightning.shards/1"
SPLITS = ("train", "validation", "test")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
SHARD_NAME = re.compile(r"(train|validation|test)-\d{6}\.tar")
UNFINISHED_SHARD = re.compile(r"\.(train|validation|test)-\d{6}\.tar\.partial")  # ShardSlot's, until it ends


class PrepareError(BadInput):
    """Bad input: the message names the file (and line) and what is wrong with it."""


@dataclass(frozen=True)
class PrepareOptions:
    """How `prepare` turns inputs into shards."""

    val_fraction: float = 0.01
    """Fraction of documents (chosen by a hash of their bytes) held out for validation."""
    test_fraction: float = 0.0
    """Fraction of documents held out for testing."""
    shard_bytes: int = 64 * 2**20
    """A shard is closed once it holds this many bytes of text."""
    interleave: int = 8
    """Shards of a split written side by side; documents are spread over them by hash."""
    text_field: str = "text"
    """Field of a JSON-lines record that holds the document."""
    skip_malformed: bool = False
    """Skip (and count) malformed JSON lines instead of stopping at the first."""
    max_document_bytes: int = 8 * 2**20
    """Longer documents are cut into pieces of at most this size, after a line break where there is one.
    Text files are read piece by piece, so files larger than memory are fine."""

    def __post_init__(self):
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be >= 0 and leave some documents for training")
        if min(self.shard_bytes, self.interleave, self.max_document_bytes) <= 0:
            raise ValueError("shard_bytes, interleave and max_document_bytes must be positive")


@dataclass
class Document:
    data: bytes
    source: str
    lang: str | None

    def __post_init__(self):
        # Names are labels (bpb by source and language, printed and logged): a file name's undecodable bytes
        # and a record's lone surrogates (\u escapes) become '?', as UTF-8 cannot hold them.
        self.source = self.source.encode("utf-8", "replace").decode()
        self.lang = self.lang and self.lang.encode("utf-8", "replace").decode()


@dataclass
class Counts:
    documents: int = 0
    bytes: int = 0

    def add(self, n_bytes: int) -> None:
        self.documents += 1
        self.bytes += n_bytes


@dataclass
class SplitStats(Counts):
    sources: dict[str, Counts] = field(default_factory=dict)
    shards: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# Reading inputs


def expand_inputs(inputs: list[str]) -> list[tuple[Path, str]]:
    """(file, default source) for each file named by `inputs`: files, directories (walked recursively,
    hidden entries skipped) and glob patterns, each in sorted order so documents keep their order from
    run to run. A file's own documents may name another `source`; otherwise a file given by name is
    its own source, and the files found in a directory or by a pattern share the directory's name."""
    files: list[tuple[Path, str]] = []
    for spec in inputs:
        if glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise PrepareError(f"{spec}: the pattern matches no file")
            fixed = Path(spec.split("*")[0].split("?")[0].split("[")[0])
            name = (fixed if spec.endswith(os.sep) or fixed.is_dir() else fixed.parent).resolve().name
            files.extend((p, name) for p in matches)
        elif os.path.isdir(spec):
            found = sorted(p for p in Path(spec).rglob("*") if p.is_file() and not _hidden(p.relative_to(spec)))
            if not found:
                raise PrepareError(f"{spec}: the directory holds no file")
            files.extend((p, Path(spec).resolve().name) for p in found)
        elif os.path.isfile(spec):
            files.append((Path(spec), source_name(Path(spec))))
        elif os.path.exists(spec):  # a pipe (such as <(zcat ...)), a socket or a device: no size, no second reading
            raise PrepareError(f"{spec}: not a regular file or directory; write its contents to a file first")
        else:
            raise PrepareError(f"{spec}: no such file or directory (relative to {os.getcwd()})")
    return files


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def source_name(path: Path) -> str:
    """A file's name without its text and JSON-lines suffixes."""
    name = path.name
    for suffix in (".gz", ".jsonl", ".json", ".txt"):
        name = name.removesuffix(suffix)
    return name or path.name


def read_documents(path: Path, source: str, options: PrepareOptions, skipped: Counts,
                   on_progress) -> Iterator[Document]:
    """Documents of one file: a record per line of JSON-lines, the whole file otherwise; either cut into
    pieces of at most `max_document_bytes`. Unreadable input is an error naming the file."""
    try:
        with open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
            if path.name.endswith(JSONL_SUFFIXES):
                for lineno, line in enumerate(stream, 1):
                    on_progress(raw.tell())
                    if not line.strip():
                        continue
                    try:
                        doc = _parse_record(line, source, options.text_field)
                    except PrepareError as error:
                        if not options.skip_malformed:
                            raise PrepareError(f"{path}:{lineno}: {error} (pass --skip_malformed to skip such lines)")
                        skipped.add(len(line))
                        continue
                    if not doc.data:
                        yield doc  # to be counted as an empty document
                    for piece in pieces(io.BytesIO(doc.data), options.max_document_bytes):
                        yield Document(piece, doc.source, doc.lang)
            else:
                empty = True
                for piece in pieces(stream, options.max_document_bytes):
                    on_progress(raw.tell())
                    empty = False
                    yield Document(piece, source, None)
                if empty:
                    yield Document(b"", source, None)  # to be counted as an empty document
    except (OSError, EOFError, zlib.error) as error:  # unreadable, not gzip, truncated, corrupt
        raise PrepareError(f"{path}: cannot read it ({error})") from None


def pieces(stream: BinaryIO, max_bytes: int) -> Iterator[bytes]:
    """The stream's bytes in pieces of at most `max_bytes`, each cut after its last line break when it has
    one. Reads one piece at a time, so a stream larger than memory is fine."""
    carry = b""
    while True:
        block = carry + stream.read(max_bytes - len(carry))
        while len(block) < max_bytes and (more := stream.read(max_bytes - len(block))):
            block += more
        if len(block) < max_bytes:
            if block:
                yield block
            return
        cut = block.rfind(b"\n") + 1 or max_bytes
        yield block[:cut]
        carry = block[cut:]


def _parse_record(line: bytes, default_source: str, text_field: str) -> Document:
    try:
        record = json.loads(line)
    except ValueError as error:
        raise PrepareError(f"malformed JSON ({error})") from None
    if not isinstance(record, dict):
        raise PrepareError(f"expected a JSON object, got {type(record).__name__}")
    text = record.get(text_field)
    if not isinstance(text, str):
        raise PrepareError(f"no string field {text_field!r}")
    source = record.get("source")
    lang = record.get("lang")
    return Document(
        text.encode("utf-8", "surrogatepass"),  # lone surrogates from \u escapes are kept, as data
        str(source) if source is not None else default_source,
        str(lang) if lang is not None else None,
    )


# ---------------------------------------------------------------------------------------------------
# Writing shards


def split_of(digest: bytes, options: PrepareOptions) -> str:
    """The split a document belongs to, from the first 8 bytes of the sha256 of its bytes."""
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < options.val_fraction:
        return "validation"
    if u < options.val_fraction + options.test_fraction:
        return "test"
    return "train"


class ShardSlot:
    """One shard being written: a tar under a temporary name (until PendingShards.publish) that is finished
    when it is full or the run ends."""

    def __init__(self, directory: Path, name: str):
        self.path = directory / name
        self.partial = directory / f".{name}.partial"
        self.file = open(self.partial, "wb")
        self.writer = wds.TarWriter(self.file, user="", group="", mode=0o644, mtime=0)
        self.counts = Counts()

    def write(self, key: str, doc: Document, extra: dict[str, bytes] | None = None) -> None:
        """One document as a sample: `key`.bin (its bytes), `key`.json (source, lang), and `extra` members."""
        meta = {"source": doc.source} | ({"lang": doc.lang} if doc.lang is not None else {})
        self.writer.write({"__key__": key, "bin": doc.data, "json": json.dumps(meta, sort_keys=True).encode(),
                           **(extra or {})})
        self.counts.add(len(doc.data))

    def finish(self) -> dict:
        """Its manifest entry, under the name it takes when published."""
        self.writer.close()
        self.file.close()  # TarWriter leaves a file it was given open: close (flush) it before hashing
        return {"path": self.path.name, **asdict(self.counts), "size": self.partial.stat().st_size,
                "sha256": _sha256(self.partial)}

    def discard(self) -> None:
        self.writer.close()
        self.file.close()
        self.partial.unlink(missing_ok=True)


class PendingShards:
    """A run's finished shards, under their temporary names until all are written; then they and the manifest
    replace what the directory held (publish). A run that fails (discard) leaves the directory as it found it:
    an earlier manifest and its shards stay usable."""

    def __init__(self, directory: Path):
        self.directory, self.finished = directory, []

    def finish(self, slot: ShardSlot) -> dict:
        self.finished.append(slot)
        return slot.finish()

    def publish(self, manifest: dict, command: str) -> None:
        (self.directory / MANIFEST).unlink(missing_ok=True)  # while shards change, no manifest describes them
        for slot in self.finished:
            os.replace(slot.partial, slot.path)
        write_atomically(self.directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        remove_stale_shards(self.directory, manifest, command)

    def discard(self) -> None:
        for slot in self.finished:
            slot.partial.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare(inputs: list[str], output: str | os.PathLike, options: PrepareOptions = PrepareOptions(),
            progress: bool = True) -> dict:
    """Write the shards of `inputs` and their manifest under `output`; return the manifest."""
    files = expand_inputs(inputs)
    out = Path(output)
    for directory in (Path(i) for i in inputs if Path(i).is_dir()):
        if directory.resolve() in (out.resolve(), *out.resolve().parents):
            raise PrepareError(f"{output}: inside the input directory {directory}, which would then hold shards "
                               "and a manifest that a later prepare of it reads as text")
    for path, _ in files:
        if out.resolve() in path.resolve().parents:
            raise PrepareError(f"{path}: an input inside the output directory {output}, whose shards and manifest "
                               "this run replaces")
    made = make_dirs(out)  # removed again if this fails: as it found them

    stats = {split: SplitStats() for split in SPLITS}
    open_slots: dict[tuple[str, int], ShardSlot] = {}
    shards_started = {split: 0 for split in SPLITS}
    empty, malformed = Counts(), Counts()
    total = sum(f.stat().st_size for f, _ in files)
    bar = byte_progress(total, "prepare", enabled=progress)
    done_before, pending = 0, PendingShards(out)
    try:
        for path, source in files:
            for doc in read_documents(path, source, options, malformed,
                                      lambda pos: bar.update(done_before + pos - bar.n)):
                if not doc.data:
                    empty.add(0)
                    continue
                digest = hashlib.sha256(doc.data).digest()
                split = split_of(digest, options)
                slot_id = (split, int.from_bytes(digest[8:12], "big") % options.interleave)
                slot = open_slots.get(slot_id)
                if slot is None:
                    slot = open_slots[slot_id] = ShardSlot(out, f"{split}-{shards_started[split]:06d}.tar")
                    shards_started[split] += 1
                split_stats = stats[split]
                slot.write(f"{split_stats.documents:09d}", doc)
                split_stats.add(len(doc.data))
                split_stats.sources.setdefault(doc.source, Counts()).add(len(doc.data))
                if slot.counts.bytes >= options.shard_bytes:
                    split_stats.shards.append(pending.finish(open_slots.pop(slot_id)))
            done_before += path.stat().st_size
        for slot_id in sorted(open_slots):
            stats[slot_id[0]].shards.append(pending.finish(open_slots.pop(slot_id)))
    except BaseException:
        pending.discard()
        for slot in open_slots.values():
            slot.discard()
        remove_empty(made)
        raise
    finally:
        bar.close()

    if not any(s.documents for s in stats.values()):
        remove_empty(made)
        raise PrepareError(f"no documents in {', '.join(inputs)} ({empty.documents} empty, {malformed.documents} "
                           "malformed lines skipped)")
    manifest = {
        "format": MANIFEST_FORMAT,
        "inputs": input_list(files),
        "options": asdict(options),
        "splits": {},
        "skipped": {"empty_documents": empty.documents, "malformed_lines": malformed.documents},
    }
    for split, s in stats.items():
        if s.documents:
            s.shards.sort(key=lambda shard: shard["path"])
            manifest["splits"][split] = {
                "documents": s.documents,
                "bytes": s.bytes,
                "sources": {name: asdict(c) for name, c in sorted(s.sources.items())},
                "shards": s.shards,
            }
    pending.publish(manifest, "prepare")
    documents = sum(s.documents for s in stats.values())
    for split, option in (("validation", "val_fraction"), ("test", "test_fraction")):
        if getattr(options, option) and split not in manifest["splits"]:
            print(f"prepare: no document fell in the {split} split ({option} {getattr(options, option):g} of "
                  f"{documents:,} documents, which go to splits by their hash): give more documents or a larger "
                  f"{option}", file=sys.stderr)
    return manifest


def remove_stale_shards(out: Path, manifest: dict, command: str = "prepare") -> None:
    """Shards an earlier run wrote here that this run did not (a pattern over the directory would find them),
    and the unfinished ones of a run that was killed."""
    current = {shard["path"] for split in manifest["splits"].values() for shard in split["shards"]}
    for path in out.iterdir():
        if SHARD_NAME.fullmatch(path.name) and path.name not in current or UNFINISHED_SHARD.fullmatch(path.name):
            print(f"{command}: removing {path}, left by an earlier run", file=sys.stderr)
            path.unlink()


def is_prepared(manifest: Path, sources: list[str], options: PrepareOptions) -> bool:
    """Whether `manifest` was written from these sources, unchanged, with these options."""
    if not manifest.is_file():
        return False
    recorded = load_manifest(str(manifest))
    return recorded.get("inputs") == input_list(expand_inputs(sources)) and recorded.get("options") == asdict(options)


def load_manifest(path: str) -> dict:
    """A manifest's JSON object, or an error naming the file."""
    try:
        return read_json_object(Path(path), "a manifest written by `blt-lightning prepare`")
    except FileNotFoundError:
        raise MissingInput(f"{path}: no manifest here (write one with `blt-lightning prepare`)") from None
    except IsADirectoryError:
        raise BadInput(f"{path}: a directory; give the manifest.json in it") from None


def input_list(files: list[tuple[Path, str]]) -> list[dict]:
    """The inputs as the manifest records them: enough to tell whether they changed since."""
    return [{"path": str(f), "size": (stat := f.stat()).st_size, "modified_ns": stat.st_mtime_ns} for f, _ in files]


def summary(manifest: dict) -> str:
    lines = []
    for split, s in manifest["splits"].items():
        lines.append(f"{split:>10}: {s['documents']:,} documents, {s['bytes']:,} bytes in {len(s['shards'])} shards")
    skipped = manifest["skipped"]
    lines.append(f"   skipped: {skipped['empty_documents']} empty documents, "
                 f"{skipped['malformed_lines']} malformed lines")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser(
        prog="blt-lightning prepare",
        description="Write text files, directories and JSON-lines (.jsonl, .jsonl.gz) as webdataset shards "
                    "with a manifest.",
    )
    parser.add_argument("inputs", nargs="+", help="files, directories (recursive) or glob patterns ('**' allowed)")
    parser.add_argument("--output", "-o", required=True, help="directory for the shards and manifest.json")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output that is not empty, "
                        "replacing the shards and manifest there")
    defaults = PrepareOptions()
    for name, value in asdict(defaults).items():
        help_text = _attribute_help(name)
        if isinstance(value, bool):
            parser.add_argument(f"--{name}", action="store_true", help=help_text)
        else:
            parser.add_argument(f"--{name}", type=type(value), default=value, help=f"{help_text} (default: {value})")
    args = vars(parser.parse_args(argv))
    inputs, output, overwrite = args.pop("inputs"), args.pop("output"), args.pop("overwrite")
    try:
        manifest = prepare(inputs, check_output_dir(output, overwrite), PrepareOptions(**args))
    except (ValueError, OSError) as error:  # PrepareError is a ValueError
        sys.exit(f"prepare: {error}")
    print(summary(manifest))
    print(f"manifest: {Path(output) / MANIFEST}")


def _attribute_help(name: str) -> str:
    """The attribute docstring of a PrepareOptions field, as jsonargparse shows it elsewhere."""
    from docstring_parser import parse_from_object

    for param in parse_from_object(PrepareOptions).params:
        if param.arg_name == name:
            return param.description or ""
    return ""
