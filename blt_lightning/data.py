"""ByteShardDataModule: webdataset shards of documents, streamed and packed into rows of byte ids.

Data flow: sources -> shards (`prepare`; or local paths, brace patterns, `pipe:` commands, http URLs)
-> documents -> ids (BOS + bytes + EOS) -> rows of `seq_len + 1` ids -> batches. Consecutive rows
overlap by one id, so every id after the first is a target exactly once. What a DataLoader worker
runs, and who reads which shards, is in streams.py; this module makes the loaders.

Resuming: the training DataLoader is stateful; checkpoints hold its position (batches trained on),
and a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from collections.abc import Iterator
from pathlib import Path

import braceexpand
import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from .errors import BadInput
from .prepare import (MANIFEST, Counts, PrepareOptions, expand_inputs, is_prepared, load_manifest, prepare,
                      read_documents)
from .streams import EvalStream, Shard, TrainStream, shard_documents
from .workers import start_forkserver, worker_options


class TrainLoader(DataLoader):
    """The training DataLoader, stateful for Lightning: its state (saved in every checkpoint, loaded on
    resume) is the number of batches trained on, so a resumed run continues with the batch that the
    interrupted run would have trained on next.

    That count, not Lightning's epoch counter, also says which epoch of the stream begins, and where in it:
    epochs are the stream's, or as many batches as Lightning trains an epoch where that is fewer
    (limit_train_batches), each then the first batches of an epoch of the stream.
    """

    def __init__(self, dataset: TrainStream, trained_batches, limit_batches, **kwargs):
        super().__init__(dataset, batch_size=None, persistent_workers=False, **kwargs)
        self.trained_batches = trained_batches  # () -> batches trained on so far, from the trainer's loop
        self.limit_batches = limit_batches  # () -> the trainer's limit_train_batches: a count, or a fraction
        self.resume_from: int | None = None

    def __iter__(self):
        done = self.trained_batches() if self.resume_from is None else self.resume_from
        self.resume_from = None
        per_epoch = self._epoch_length()
        self.dataset.epoch, self.dataset.skip = divmod(done, per_epoch) if per_epoch else (0, done)
        return super().__iter__()  # workers copy the stream now, with its epoch and skip

    def _epoch_length(self) -> int | None:
        """Batches an epoch trains (None: endless), as Lightning counts them: an int limit is a count, a float a
        fraction. (Lightning knows its count only after the first epoch's iterator is made.)"""
        per_epoch, limit = self.dataset.batches_per_epoch, self.limit_batches()
        if per_epoch is None:
            return None
        return min(per_epoch, limit) if isinstance(limit, int) else int(per_epoch * limit)

    def layout(self) -> dict:
        """The stream's layout, the readers per rank (each worker reads its own shards) and the trainer's limit
        of batches an epoch (which may cut the stream's epochs short)."""
        return {**self.dataset.layout(), "workers": max(1, self.num_workers),
                "limit_train_batches": self.limit_batches()}

    def state_dict(self) -> dict:
        return {"batches": self.trained_batches(), "layout": self.layout()}

    def load_state_dict(self, state: dict) -> None:
        # Only what the checkpoint recorded: one of an earlier version may lack a key.
        changed = sorted(k for k, v in self.layout().items() if k in state["layout"] and state["layout"][k] != v)
        if changed:
            rank_zero_warn(f"resuming with different training data settings ({', '.join(changed)}): the stream "
                           "continues at the same batch count, but not with the batches the run would have seen")
        self.resume_from = state["batches"]


class ByteShardDataModule(L.LightningDataModule):
    def __init__(
        self,
        sources: list[str] | None = None,
        manifest: str | None = None,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        shard_dir: str | None = None,
        prepare: PrepareOptions = PrepareOptions(),
        seq_len: int = 1024,
        batch_size: int = 8,
        num_workers: int = 0,
        shuffle_rows: int = 1024,
        mix_shards: int = 8,
        batches_per_epoch: int | None = None,
        seed: int = 0,
        skip_bad_shards: bool = False,
        test_split: str = "test",
    ):
        """Byte shards streamed with webdataset and packed into rows of `seq_len + 1` ids.

        Name the data by `sources` (raw inputs, prepared into shards on first use) or by `manifest`
        (written by `blt-lightning prepare`), not both; shard URLs per split override either's shards.

        Args:
            sources: Text files, directories, globs or JSON-lines files, prepared into shards under
                `shard_dir` by `prepare_data` when their manifest is missing or stale.
            manifest: A manifest.json written by `prepare`; its shard paths are relative to it.
            train_shards: Training shard URLs: paths, brace patterns ("d/train-{000000..000009}.tar"),
                "pipe:COMMAND" or http(s) URLs.
            val_shards: Validation shard URLs.
            test_shards: Test shard URLs.
            shard_dir: Where `sources` are prepared (default: "<trainer.default_root_dir>/shards").
            prepare: How `sources` are split and sharded.
            seq_len: Predicted positions per row; rows hold seq_len + 1 ids.
            batch_size: Rows per batch on each rank.
            num_workers: DataLoader workers per rank; each reads its own shards.
            shuffle_rows: Rows in each training reader's shuffle buffer.
            mix_shards: Shards each training reader reads at once, drawing each document from a random one.
            batches_per_epoch: Training batches per epoch on each rank (default: about one pass over
                the training bytes when the manifest gives them, else one endless epoch).
            seed: Seed of the shard order and row shuffle.
            skip_bad_shards: Skip (with a warning that counts them) shards that cannot be read, or that end
                before their manifest says, instead of stopping with an error that names the shard.
            test_split: The manifest's split that `test` evaluates (test_shards, when given, are read instead).
        """
        super().__init__()
        if sources and manifest:
            raise ValueError("give sources or a manifest, not both (set the other to null)")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be at least 1, not {value}")
        self.save_hyperparameters(logger=False)
        self.sources, self.manifest_path, self.shard_dir = sources, manifest, shard_dir
        self.shard_urls = {"train": train_shards, "validation": val_shards, "test": test_shards}
        self.prepare_options = prepare
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.shuffle_rows, self.mix_shards = shuffle_rows, mix_shards
        self.batches_per_epoch, self.seed, self.skip_bad_shards = batches_per_epoch, seed, skip_bad_shards
        self.test_split = "test" if test_shards else test_split
        self.shards: dict[str, list[Shard]] = {}
        self.manifest_read: str | None = None  # the manifest setup() read the shards of
        self.stored_entropies: dict | None = None  # its record of the entropy model that computed stored entropies
        self.rank, self.world_size = 0, 1
        # Sources are prepared once, by global rank 0: default_root_dir is shared by every node (it holds
        # the checkpoints too), and nodes preparing the same shards at once would write over each other.
        self.prepare_data_per_node = False

    def _prepared_dir(self) -> Path:
        if self.shard_dir is not None:
            return Path(self.shard_dir)
        if self.trainer is None:
            raise ValueError("set shard_dir: without a trainer there is no default_root_dir to prepare sources under")
        return Path(self.trainer.default_root_dir) / "shards"

    def prepare_data(self) -> None:
        if not self.sources:
            return
        out = self._prepared_dir()
        if is_prepared(out / MANIFEST, self.sources, self.prepare_options):
            return
        rank_zero_info(f"Preparing shards of {self.sources} under {out}")
        prepare(self.sources, out, self.prepare_options)

    def setup(self, stage: str) -> None:
        manifest = self.manifest_path or (str(self._prepared_dir() / MANIFEST) if self.sources else None)
        record = load_manifest(manifest) if manifest else {}
        self.shards = manifest_shards(record, manifest) if manifest else {}
        self.manifest_read = manifest
        self.stored_entropies = record.get("entropies")
        for split, urls in self.shard_urls.items():
            if urls:
                self.shards[split] = [Shard(u) for u in expand_urls(urls)]
        sampler_kwargs = self.trainer.distributed_sampler_kwargs if self.trainer else None
        if sampler_kwargs:
            self.rank, self.world_size = sampler_kwargs["rank"], sampler_kwargs["num_replicas"]
        if self.num_workers:
            start_forkserver()  # now: its imports overlap the trainer's setup instead of delaying the first batch

    def _split(self, split: str) -> list[Shard]:
        if not self.shards.get(split):
            where = f"{self.manifest_read} has none, so " if self.manifest_read else ""
            raise BadInput(f"no {split} shards: {where}name them (sources with a {split} fraction, manifest, "
                           f"or {split} shard URLs)")
        return self.shards[split]

    def train_dataloader(self) -> DataLoader:
        shards = self._split("train")
        readers = self.world_size * max(1, self.num_workers)
        if len(shards) < readers:
            raise BadInput(
                f"{len(shards)} training shards cannot feed {readers} readers ({self.world_size} ranks x "
                f"{max(1, self.num_workers)} workers): prepare smaller shards or use fewer workers"
            )
        stream = TrainStream(shards, self.seq_len, self.batch_size, self.rank, self.world_size, self.seed,
                             self.shuffle_rows, self.mix_shards, self._batches_per_epoch(shards), self.skip_bad_shards)
        return TrainLoader(stream, self._trained_batches, self._limit_batches, **worker_options(self.num_workers))

    def _trained_batches(self) -> int:
        """Training batches this rank has trained on, from Lightning's loop counters: batches fetched
        ahead (prefetching, workers) do not count."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def _limit_batches(self) -> int | float:
        return self.trainer.limit_train_batches if self.trainer is not None else 1.0

    def _batches_per_epoch(self, shards: list[Shard]) -> int | None:
        if self.batches_per_epoch is not None:
            return self.batches_per_epoch
        if any(s.bytes is None for s in shards):
            return None
        ids = sum(s.bytes + 2 * s.documents for s in shards)
        return max(1, ids // (self.seq_len * self.batch_size * self.world_size))

    def _eval_loader(self, split: str) -> DataLoader:
        shards = self._split(split)
        if self.world_size > 1 and any(s.documents is None for s in shards):
            rank_zero_warn(f"{split} shards without a manifest: ranks may run different numbers of batches")
        stream = EvalStream(shards, self.seq_len, self.batch_size, self.rank, self.world_size, self.num_workers,
                            self.skip_bad_shards)
        return DataLoader(stream, batch_size=None, **worker_options(self.num_workers))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_split)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test" if self.shards.get("test") else "validation")


def iter_documents(data: list[str], split: str = "validation") -> Iterator[bytes]:
    """Documents, as raw bytes, of data named any way: manifests (their `split`), shard URLs (.tar files,
    brace patterns, pipe: commands, http), or text, JSON-lines and directory inputs as `prepare` reads them."""
    for spec in data:
        if spec.endswith(".json"):
            shards = read_manifest(spec).get(split)
            if not shards:
                raise ValueError(f"{spec}: the manifest has no {split} split")
        elif is_shard_url(spec):
            shards = [Shard(url) for url in expand_urls(spec)]
        else:
            for path, source in expand_inputs([spec]):
                yield from (doc.data for doc in read_documents(path, source, PrepareOptions(), Counts(),
                                                               lambda _: None))
            continue
        for shard in shards:  # from a manifest, with the counts and sha256 it is checked against
            yield from shard_documents(shard)


def is_shard_url(spec: str) -> bool:
    """Whether a data spec names shards (.tar paths or patterns, pipe: commands, http URLs), not inputs to prepare."""
    return spec.startswith(("pipe:", "http://", "https://")) or spec.split("?")[0].endswith(".tar")


def expand_urls(urls: str | list[str]) -> list[str]:
    """Shard URLs with brace patterns expanded, in the order given."""
    return [u for pattern in ([urls] if isinstance(urls, str) else urls) for u in braceexpand.braceexpand(pattern)]


def read_manifest(path: str) -> dict[str, list[Shard]]:
    """The shards of each split named in a manifest, with their document and byte counts."""
    return manifest_shards(load_manifest(path), path)


def manifest_shards(manifest: dict, path: str) -> dict[str, list[Shard]]:
    """The shards of each split of the manifest read from path, with their document and byte counts."""
    base = Path(path).absolute().parent  # relative, a folder named `run:1` would read as a URL scheme
    try:
        stored = "entropies" in manifest
        return {
            split: [Shard(str(base / s["path"]), s["documents"], s["bytes"], stored, s.get("sha256"))
                    for s in info["shards"]]
            for split, info in manifest["splits"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise BadInput(f"{path}: not a manifest written by `blt-lightning prepare` ({error!r})") from None
