"""The pipeline a DataLoader worker runs: shards -> documents -> rows of byte ids -> batches.

Workers start from a forkserver (workers.py) that has imported this module, and they unpickle the
streams: so everything here is a module-level function or a plain picklable object, and nothing here
imports Lightning (seconds of imports and a hundred MB that no worker needs).

Who reads what: each (rank, DataLoader worker) pair is one *reader*; reader k of n reads shards k,
k+n, k+2n, ... and no other. Rank and world size are given by the DataModule (from Lightning), never
read from environment variables.

- Training: each reader cycles through its shards forever (a new shard order per pass, seeded by
  `seed`, epoch and reader), reading a few shards at once and drawing documents from them at random;
  it packs documents across shard ends and shuffles rows in a buffer. An epoch is exactly
  `batches_per_epoch` batches on every rank, so no rank waits for another at the end of an epoch.
- Validation and test: the same fixed bytes every run, in the same order. Rows restart at every shard,
  so rows (and so bpb) do not depend on how many ranks or workers there are; the last row of a shard
  and the last batch of a reader are padded. With a manifest (which gives shard sizes), ranks that
  would run fewer batches get all-padding batches (which count zero bytes), so every rank runs the
  same number of forward passes: collective ops inside the model (FSDP) cannot hang.
- Bad shards (unreadable, corrupt, shorter than their manifest says or without its sha256, a `pipe:`
  command or http transfer that fails) stop the run with an error that names the shard, or with
  `skip_bad_shards` are skipped with a warning that counts them.
"""

import hashlib
import itertools
import json
import math
import random
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .errors import BadInput
from .vocab import PAD, document_ids, encode, is_byte

ENTROPY_MEMBER = "entropies.f16"  # per document: float16 next-byte entropies of its ids, BOS to EOS

@dataclass(frozen=True)
class Shard:
    url: str
    documents: int | None = None  # known when the shard comes from a manifest
    bytes: int | None = None
    entropies: bool = False  # the manifest says its documents have stored entropies
    sha256: str | None = None  # of the file, as the manifest records it

    def rows(self, seq_len: int) -> int:
        """Rows the eval stream makes of this shard (needs the manifest's counts)."""
        ids = self.bytes + 2 * self.documents
        return math.ceil((ids - 1) / seq_len)


def current_worker() -> tuple[int, int]:
    """(index, count) of this DataLoader worker; (0, 1) when the main process loads."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def current_reader(rank: int, world_size: int) -> tuple[int, int]:
    """(index, count) of the reader this process is: one per DataLoader worker of each rank."""
    worker, workers = current_worker()
    return rank * workers + worker, world_size * workers


class ShardError(BadInput):
    """A shard that cannot be read: missing, corrupt, truncated, or not what its manifest says."""


class Sample(NamedTuple):
    """A document as a shard stores it."""

    data: bytes
    entropies: torch.Tensor | None  # [len + 2] (BOS to EOS), when `blt-lightning entropies` stored them
    meta: dict  # its .json member: source and lang ({} when it has none)
    key: str  # its name in the shard


def shard_samples(shard: Shard) -> Iterator[Sample]:
    """The documents of one shard, in order, then the checks that need all of it: past the archive's end only zero
    bytes (Python's tarfile takes a corrupt header after the first member for the end); with the manifest's count,
    as many documents (a tar cut at a member boundary reads as a shorter valid tar); with its sha256, that sha256
    (a tar does not check its members' data). A `pipe:` command that fails, or an http transfer, shows only when
    its stream closes: that is then the error, naming the shard."""
    url = shard.url
    try:
        stream = _Hashed(wds.gopen(url))  # opened here, so that it is closed here even when a reader stops midway
    except Exception as error:
        raise ShardError(f"{url}: cannot open shard ({error})") from error
    count = 0
    try:
        for count, sample in enumerate(_checked(url, wds.tariterators.group_by_keys(_tar_files(url, stream))), 1):
            yield sample
    except Exception as error:  # tarfile, gzip, OS and webdataset errors alike: name the shard
        if (failed := _close(stream, url, count)) is not None:  # the command or transfer failed: the cause
            raise failed from error
        if isinstance(error, ShardError):
            raise
        raise ShardError(f"{url}: corrupt shard, unreadable after {count} documents "
                         f"({type(error).__name__}: {error})") from error
    except BaseException:  # the reader stopped midway (an epoch ended): a pipe's command may then fail (SIGPIPE)
        _close(stream, url, count)
        raise
    if (failed := _close(stream, url, count)) is not None:
        raise failed
    if shard.documents is not None and count != shard.documents:
        raise ShardError(f"{url}: truncated shard, {count} documents where the manifest says {shard.documents}")
    if shard.sha256 is not None and stream.digest.hexdigest() != shard.sha256:
        raise ShardError(f"{url}: corrupt shard, its sha256 is not the manifest's (its {count} documents have been "
                         "read)")


class _Hashed:
    """A shard's stream that hashes what is read from it."""

    def __init__(self, stream):
        self.stream, self.digest = stream, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def close(self) -> None:
        self.stream.close()


def _tar_files(url: str, stream) -> Iterator[dict]:
    """The files of a tar stream, as webdataset's tar_file_expander gives them to group_by_keys, read to the end
    of the stream: Python's tarfile takes a corrupt header after the first member for the end of the archive,
    which is otherwise followed by zero bytes only."""
    tar = tarfile.open(fileobj=stream, mode="r|*")  # decompresses .tar.gz and the like
    for member in tar:
        if member.isreg() and not member.name.startswith("__"):  # webdataset's metadata files are not samples
            yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": url}
        tar.members = []  # a stream's members need not be kept
    while rest := tar.fileobj.read(1 << 16):
        if rest.strip(b"\0"):
            raise ShardError(f"{url}: corrupt shard, data after where tarfile found its end (a corrupt header, "
                             "or archives joined end to end)")


def _close(stream, url: str, count: int) -> ShardError | None:
    """Close the stream of shard `url`, read up to document `count`; the error to raise if it failed (webdataset
    checks a `pipe:` command's exit status, and so an http transfer's, when it closes)."""
    try:
        stream.close()
    except Exception as error:
        return ShardError(f"{url}: its stream failed after {count} documents ({type(error).__name__}: {error})")
    return None


def _checked(url: str, samples: Iterator[dict]) -> Iterator[Sample]:
    for sample in samples:
        key = sample.get("__key__")
        if "bin" not in sample:
            raise ShardError(f"{url}: sample {key!r} has no .bin member")
        data, stored, entropies = sample["bin"], sample.get(ENTROPY_MEMBER), None
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except ValueError as error:
            raise ShardError(f"{url}: sample {key!r} has a .json member that is not JSON ({error})") from None
        if stored is not None:
            entropies = torch.frombuffer(bytearray(stored), dtype=torch.float16).float()
            if len(entropies) != len(data) + 2:
                raise ShardError(f"{url}: sample {key!r} has {len(entropies)} entropies for {len(data) + 2} ids")
        yield Sample(data, entropies, meta if isinstance(meta, dict) else {}, key)


class BadShards:
    """What a reader does with a shard it cannot read: stop with the error, or (`skip`) warn and go on."""

    def __init__(self, skip: bool):
        self.skip, self.skipped = skip, 0

    def samples(self, shard: "Shard") -> Iterator[Sample]:
        """The shard's samples; when skipping, those before the fault (a shard is not re-read)."""
        try:
            yield from shard_samples(shard)
        except ShardError as error:
            if not self.skip:
                raise
            self.skipped += 1
            warnings.warn(f"skipped the rest of a bad shard ({self.skipped} so far this epoch in this reader): "
                          f"{error}")


def shard_documents(shard: Shard) -> Iterator[bytes]:
    """The documents of one shard, in order, as raw bytes (checked as shard_samples checks them)."""
    return (sample.data for sample in shard_samples(shard))


# Per-id values that travel with the ids, cut into rows the same way: stored next-byte entropies, and in
# evaluation the source and language of each id's document (as group_key hashes).
Side = dict[str, torch.Tensor]
TaggedDocument = tuple[int, bytes, Side]  # (tag, bytes, per-id values [len + 2])
Row = tuple[int, torch.Tensor, Side]  # (tag, ids [seq_len + 1], per-id values [seq_len + 1])


def pack_rows(docs: Iterable[TaggedDocument], seq_len: int, pad_last: bool) -> Iterator[Row]:
    """Rows of `seq_len + 1` ids cut from the documents' ids laid end to end, overlapping by one id, with
    the documents' per-id values cut the same way.

    Documents come tagged (with their shard); each row comes with the tag of the document it ends in.
    With `pad_last`, what is left at the end becomes a last row padded with PAD (per-id values 0).
    """
    pending, pending_side, tag = torch.empty(0, dtype=torch.long), None, -1
    for tag, data, side in docs:
        if pending_side is None:
            pending_side = {k: v[:0] for k, v in side.items()}
        elif side.keys() != pending_side.keys():
            raise ValueError(f"shard {tag}: some documents have stored entropies and others do not")
        pending = torch.cat([pending, encode(data)])
        pending_side = {k: torch.cat([v, side[k]]) for k, v in pending_side.items()}
        full = (len(pending) - 1) // seq_len
        for r in range(full):  # copies: a view would keep the whole document alive in the shuffle buffer
            cut = slice(r * seq_len, (r + 1) * seq_len + 1)
            yield tag, pending[cut].clone(), {k: v[cut].clone() for k, v in pending_side.items()}
        pending, pending_side = pending[full * seq_len :], {k: v[full * seq_len :] for k, v in pending_side.items()}
    if pad_last and len(pending) > 1:
        yield tag, pad_row(pending, seq_len, PAD), {k: pad_row(v, seq_len, 0) for k, v in pending_side.items()}


def stored_entropies(sample: Sample) -> Side:
    return {} if sample.entropies is None else {"entropies": sample.entropies}


def group_key(name: str) -> int:
    """A stable 63-bit key of a source or language name (the same in every process, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") >> 1


UNKNOWN = "unknown"  # the group of documents that name no source or language
GROUP_KINDS = ("source", "lang")  # what evaluation splits the bpb by: the documents' fields of these names


def evaluation_groups(sample: Sample, names: dict[int, str]) -> Side:
    """Stored entropies, plus the keys of the document's source and language for each of its ids (their
    names are added to `names`): what per-source and per-language bpb are summed by."""
    length = len(sample.data) + 2
    side = stored_entropies(sample)
    for kind in GROUP_KINDS:
        name = str(sample.meta.get(kind) or UNKNOWN)
        names[group_key(name)] = name
        side[kind] = torch.full((length,), group_key(name), dtype=torch.long)
    return side


def pad_row(values: torch.Tensor, seq_len: int, fill) -> torch.Tensor:
    row = torch.full((seq_len + 1,), fill, dtype=values.dtype)
    row[: len(values)] = values
    return row


def shuffle_buffer(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Yield items in random order from a buffer of `size` (1 or less: in order)."""
    if size <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def make_batch(rows: list[tuple[int, int, torch.Tensor, Side]], batch_size: int, seq_len: int, side_keys) -> dict:
    """Stack (shard, number, ids, per-id values) rows into a batch, topped up to `batch_size` with padding."""
    empty = (-1, -1, *_empty_row(seq_len, side_keys))
    shards, numbers, ids, sides = zip(*(rows + [empty] * (batch_size - len(rows))))
    ids = torch.stack(ids)
    batch = {
        "ids": ids,  # [B, seq_len + 1]: inputs are ids[:, :-1], targets ids[:, 1:]
        "doc_ids": document_ids(ids),  # [B, seq_len + 1]: attention stays where these are equal
        "shard": torch.tensor(shards),  # [B]: the shard a row ends in (-1: padding)
        "row": torch.tensor(numbers),  # [B]: the row's number within its shard (eval; -1 otherwise)
        "bytes": int(is_byte(ids[:, 1:]).sum()),  # bytes among the targets, counted here so no device waits for it
    }
    for key in side_keys:  # entropies: [B, seq_len + 1] stored next-byte entropies, float32; source, lang: group keys
        batch[key] = torch.stack([side[key] for side in sides])
    return batch


class TrainStream(IterableDataset):
    """Endless shuffled rows for one rank; an epoch is `batches_per_epoch` batches (None: endless).

    Each reader's batches are a pure function of (seed, epoch, reader), which is what makes resuming
    exact: a stream told to `skip` the first batches of an epoch regenerates and drops them. The
    DataLoader takes batches from its workers in turn, so batch j of an epoch comes from worker j % W;
    after skipping S batches, worker w plays the part of worker (w + S) % W, and the turns continue
    where the interrupted run left them.
    """

    def __init__(self, shards: list[Shard], seq_len: int, batch_size: int, rank: int, world_size: int,
                 seed: int, shuffle_rows: int, mix_shards: int, batches_per_epoch: int | None,
                 skip_bad_shards: bool = False):
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_rows, self.mix_shards = shuffle_rows, mix_shards
        self.batches_per_epoch, self.skip_bad_shards = batches_per_epoch, skip_bad_shards
        self.epoch, self.skip = 0, 0  # set by TrainLoader before workers copy the stream

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("an endless training stream has no length")
        return self.batches_per_epoch

    def layout(self) -> dict:
        """What the order of batches depends on besides the epoch and the workers: a resumed run must have the same."""
        return {"shards": [s.url.rsplit("/", 1)[-1] for s in self.shards], "seq_len": self.seq_len,
                "batch_size": self.batch_size, "world_size": self.world_size, "seed": self.seed,
                "shuffle_rows": self.shuffle_rows, "mix_shards": self.mix_shards,
                "batches_per_epoch": self.batches_per_epoch}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, workers = current_worker()
        part = (worker + self.skip) % workers  # the worker whose batches this one makes
        reader, readers = self.rank * workers + part, self.world_size * workers
        mine = list(range(reader, len(self.shards), readers))
        if not mine:
            raise ValueError(f"reader {reader} of {readers} has no training shard")
        rng = random.Random(f"train/{self.seed}/{self.epoch}/{reader}")  # str seeds ignore PYTHONHASHSEED
        docs = endless_documents(self.shards, mine, rng, self.mix_shards, BadShards(self.skip_bad_shards))
        rows = shuffle_buffer(((s, -1, row, side) for s, row, side in pack_rows(docs, self.seq_len, pad_last=False)),
                              self.shuffle_rows, rng)
        done = self.skip // workers + (part < self.skip % workers)  # batches of this part already trained on
        for _ in range(done * self.batch_size):
            next(rows)
        if self.batches_per_epoch is None:
            batches = itertools.count()
        else:
            batches = range(self.batches_per_epoch // workers + (part < self.batches_per_epoch % workers) - done)
        for _ in batches:
            picked = [next(rows) for _ in range(self.batch_size)]
            yield make_batch(picked, self.batch_size, self.seq_len, picked[0][3].keys())


def endless_documents(shards: list[Shard], mine: list[int], rng: random.Random, mix: int,
                      bad: BadShards) -> Iterator[TaggedDocument]:
    """(shard, document, stored entropies) from the shards `mine`, pass after pass, each pass in a fresh shard order.

    `mix` shards are read at once and each next document comes from a random one of them: a shard often
    holds few sources (inputs are read one after another), and reading one shard at a time would feed
    the model one source for hundreds of steps.
    """
    while True:
        waiting = iter(rng.sample(mine, len(mine)))
        reading = []  # (shard, its samples)
        read_any = False
        while True:
            reading += [(s, bad.samples(shards[s])) for s in itertools.islice(waiting, mix - len(reading))]
            if not reading:
                break
            i = rng.randrange(len(reading))
            shard, samples = reading[i]
            sample = next(samples, None)
            if sample is None:
                reading.pop(i)
            else:
                read_any = True
                yield shard, sample.data, stored_entropies(sample)
        if not read_any:
            raise ShardError(f"no document could be read from any of the shards {[shards[s].url for s in mine]}")


class EvalStream(IterableDataset):
    """Every row of the shards exactly once across ranks and workers, in a fixed order. Batches also say
    which source and language each id's document is of (`source`, `lang`: group keys, named in
    `group_names`), for bpb per source and per language."""

    def __init__(self, shards: list[Shard], seq_len: int, batch_size: int, rank: int, world_size: int, num_workers: int,
                 skip_bad_shards: bool = False):
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.skip_bad_shards = skip_bad_shards

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        reader, readers = current_reader(self.rank, self.world_size)
        assert readers == self.world_size * self.workers, "the stream was made for another number of workers"
        with_entropies = self.sizes_known() and any(s.entropies for s in self.shards)  # a manifest says so
        planned_keys = ("entropies",) * with_entropies + GROUP_KINDS
        bad, batch, names = BadShards(self.skip_bad_shards), [], {}

        def batch_of(rows, keys):
            return make_batch(rows, self.batch_size, self.seq_len, keys) | {"group_names": dict(names)}

        for shard in range(reader, len(self.shards), readers):
            for row in self._shard_rows(shard, bad, planned_keys, names):
                batch.append(row)
                if len(batch) == self.batch_size:
                    yield batch_of(batch, row[3].keys())
                    batch = []
        if batch:
            yield batch_of(batch, batch[0][3].keys())
        if reader % self.workers == 0 and self.sizes_known():
            per_rank = self.batches_per_rank()
            for _ in range(max(per_rank) - per_rank[self.rank]):
                yield batch_of([], planned_keys)

    def _shard_rows(self, shard: int, bad: BadShards, planned_keys: tuple, names: dict[int, str]) -> Iterator[tuple]:
        """(shard, number, ids, per-id values) of each row of a shard; rows lost to a skipped bad shard come
        as padding when the manifest says how many there are, so batch counts stay as planned."""
        docs = ((shard, sample.data, evaluation_groups(sample, names)) for sample in bad.samples(self.shards[shard]))
        number = -1
        for number, (_, row, side) in enumerate(pack_rows(docs, self.seq_len, pad_last=True)):
            yield shard, number, row, side
        if self.sizes_known():
            for _ in range(self.shards[shard].rows(self.seq_len) - number - 1):
                yield -1, -1, *_empty_row(self.seq_len, planned_keys)

    def __len__(self) -> int:
        if not self.sizes_known():
            raise TypeError("the number of batches is unknown without the shards' sizes (a manifest)")
        return max(self.batches_per_rank())

    def sizes_known(self) -> bool:
        return all(s.documents is not None for s in self.shards)

    def batches_per_rank(self) -> list[int]:
        """Batches each rank's readers make of their shards, before padding to the busiest rank."""
        readers = self.world_size * self.workers

        def reader_batches(reader: int) -> int:
            rows = sum(self.shards[s].rows(self.seq_len) for s in range(reader, len(self.shards), readers))
            return math.ceil(rows / self.batch_size)

        return [sum(reader_batches(r * self.workers + w) for w in range(self.workers)) for r in range(self.world_size)]


def _empty_row(seq_len: int, side_keys) -> tuple[torch.Tensor, Side]:
    side = {key: torch.zeros(seq_len + 1, dtype=torch.long if key in GROUP_KINDS else torch.float32)
            for key in side_keys}
    return torch.full((seq_len + 1,), PAD, dtype=torch.long), side
