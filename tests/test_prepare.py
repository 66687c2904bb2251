import hashlib
import io
import json
import os
import sys
import tarfile

import pytest
from conftest import make_documents, write_jsonl

from blt_lightning.data import read_manifest
from blt_lightning.prepare import MANIFEST, PrepareError, PrepareOptions, main, prepare
from blt_lightning.streams import EvalStream

OPTIONS = PrepareOptions(val_fraction=0.2, test_fraction=0.1, shard_bytes=2000, interleave=4)


def shard_samples(path):
    """{key: (bytes, meta)} of a shard, read with tarfile (independently of webdataset)."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {k: (v["bin"], json.loads(v["json"])) for k, v in samples.items()}


def test_manifest_counts_equal_what_the_shards_hold(corpus, tmp_path):
    manifest = prepare([str(corpus)], tmp_path / "out", OPTIONS, progress=False)
    docs = make_documents(240)
    assert sum(s["documents"] for s in manifest["splits"].values()) == len(docs)
    seen = []
    for split, info in manifest["splits"].items():
        assert len(info["shards"]) > 1
        per_source = {}
        for shard in info["shards"]:
            path = tmp_path / "out" / shard["path"]
            samples = shard_samples(path)
            assert shard["documents"] == len(samples)
            assert shard["bytes"] == sum(len(d) for d, _ in samples.values())
            assert shard["size"] == path.stat().st_size
            assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            for data, meta in samples.values():
                per_source.setdefault(meta["source"], [0, 0])
                per_source[meta["source"]][0] += 1
                per_source[meta["source"]][1] += len(data)
                seen.append((data, meta["source"], meta["lang"]))
        assert {k: [v["documents"], v["bytes"]] for k, v in info["sources"].items()} == per_source
        assert info["documents"] == sum(v[0] for v in per_source.values())
        assert info["bytes"] == sum(v[1] for v in per_source.values())
    expected = [(d["text"].encode(), d["source"], d["lang"]) for d in docs]
    assert sorted(seen) == sorted(expected)


def test_split_is_deterministic_and_by_content(corpus, tmp_path):
    first = prepare([str(corpus)], tmp_path / "a", OPTIONS, progress=False)
    again = prepare([str(corpus)], tmp_path / "a", OPTIONS, progress=False)  # a re-run over the same output
    assert first == again
    for shard in first["splits"]["train"]["shards"]:
        assert hashlib.sha256((tmp_path / "a" / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]

    # The same documents in another order and file land in the same splits.
    shuffled = write_jsonl(tmp_path / "other.jsonl.gz", make_documents(240)[::-1], gz=True)
    other = prepare([str(shuffled)], tmp_path / "b", OPTIONS, progress=False)

    def texts(out, manifest, split):
        return sorted(d for s in manifest["splits"][split]["shards"]
                      for d, _ in shard_samples(out / s["path"]).values())

    for split in ("train", "validation", "test"):
        assert texts(tmp_path / "a", first, split) == texts(tmp_path / "b", other, split)
    n_val = first["splits"]["validation"]["documents"]
    assert 0.1 * 240 < n_val < 0.3 * 240


def test_malformed_json_names_file_and_line_and_leaves_the_output_as_it_was(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", make_documents(100))
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n{"text": "fine too"}\n')
    out = tmp_path / "out"
    with pytest.raises(PrepareError, match=r"b\.jsonl:2: malformed JSON"):
        prepare([str(good), str(bad)], out, OPTIONS, progress=False)
    assert not out.exists(), "a failed run left its new folder behind"

    skipping = PrepareOptions(**{**OPTIONS.__dict__, "skip_malformed": True})
    main([str(good), str(bad), "--output", str(out), "--skip_malformed", "--val_fraction", "0.2",
          "--test_fraction", "0.1", "--shard_bytes", "2000", "--interleave", "4"])
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["skipped"]["malformed_lines"] == 1
    assert sum(s["documents"] for s in manifest["splits"].values()) == 102

    # Over that output, a run that fails once it has finished shards of its own leaves it usable, as it was.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(PrepareError, match=r"b\.jsonl:2: malformed JSON"):
        prepare([str(good), str(bad)], out, PrepareOptions(**{**OPTIONS.__dict__, "shard_bytes": 100}), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert prepare([str(good), str(bad)], out, skipping, progress=False) == manifest


@pytest.mark.parametrize("line, problem", [('["a list"]', "expected a JSON object"),
                                           ('{"body": "x"}', "no string field 'text'")])
def test_records_without_text_are_errors(tmp_path, line, problem):
    path = tmp_path / "c.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(PrepareError, match=f"c.jsonl:1: {problem}"):
        prepare([str(path)], tmp_path / "out", OPTIONS, progress=False)


def test_text_files_directories_globs_and_text_field(tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    a = b"plain text \xff invalid utf-8 is data"
    (tree / "a.txt").write_bytes(a)
    (tree / "sub" / "b.md").write_text("nested file")
    (tree / "sub" / "empty.txt").write_text("")
    (tree / ".hidden").write_text("skipped")
    write_jsonl(tmp_path / "r.jsonl", [{"body": "in another field", "lang": "en"}])
    out = tmp_path / "out"
    manifest = prepare([str(tree), str(tmp_path / "r.jsonl")], out, PrepareOptions(val_fraction=0.0, text_field="body"),
                       progress=False)
    train = manifest["splits"]["train"]
    assert train["documents"] == 3 and manifest["skipped"]["empty_documents"] == 1
    assert train["sources"] == {"tree": {"documents": 2, "bytes": len(a) + len("nested file")},
                                "r": {"documents": 1, "bytes": 16}}
    data = sorted(d for s in train["shards"] for d, _ in shard_samples(out / s["path"]).values())
    assert data == sorted([a, b"nested file", b"in another field"])

    globbed = prepare([str(tree / "**" / "*.txt")], tmp_path / "g", PrepareOptions(val_fraction=0.0), progress=False)
    assert globbed["splits"]["train"]["sources"] == {"tree": {"documents": 1, "bytes": len(a)}}


def test_names_utf8_cannot_hold_become_question_marks_that_evaluation_can_group_by(tmp_path):
    """A file name's undecodable bytes and a record's lone surrogate (a \\u escape) name sources and languages."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "f\udcff.txt").write_text("a file whose name is not UTF-8")  # the byte 0xff, as Python holds it
    (tmp_path / "in" / "r.jsonl").write_text('{"text": "a record", "source": "\\ud800x", "lang": "\\udfffy"}\n')
    files = sorted((tmp_path / "in").iterdir())
    manifest = prepare([str(f) for f in files], tmp_path / "out", PrepareOptions(val_fraction=0.0), progress=False)
    assert set(manifest["splits"]["train"]["sources"]) == {"f?", "?x"}
    split = read_manifest(str(tmp_path / "out" / MANIFEST))["train"]
    batch = next(iter(EvalStream(split, 64, 4, 0, 1, 0)))
    assert set(batch["group_names"].values()) >= {"f?", "?x", "?y"}


def test_progress_in_a_log_file_is_lines(corpus, tmp_path, monkeypatch):
    """A batch job's stderr is a file, not a terminal: progress still shows, a line at a time."""
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    prepare([str(corpus)], tmp_path / "out", OPTIONS)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and lines[0].startswith("prepare:   0%") and lines[-1].startswith("prepare: 100%")


def test_a_requested_split_that_no_document_fell_in_is_said_and_evaluate_names_the_splits_there(tmp_path, capsys):
    write_jsonl(tmp_path / "few.jsonl", [{"text": f"document {i}"} for i in range(3)])
    manifest = prepare([str(tmp_path / "few.jsonl")], tmp_path / "out",
                       PrepareOptions(val_fraction=0.01, test_fraction=0.01), progress=False)
    assert list(manifest["splits"]) == ["train"]
    err = capsys.readouterr().err
    for split, option in (("validation", "val_fraction"), ("test", "test_fraction")):
        assert f"no document fell in the {split} split ({option} 0.01 of 3 documents" in err
    from blt_lightning.evaluate import data_module

    with pytest.raises(ValueError, match=r"manifest.json: no test split \(it has train\): choose one with --split"):
        data_module([str(tmp_path / "out" / MANIFEST)], tmp_path, "test", 32, 2, 0)


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(PrepareError, match="nope.jsonl: no such file"):
        prepare([str(tmp_path / "nope.jsonl")], tmp_path / "out", OPTIONS, progress=False)
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)  # as <(zcat docs.jsonl.gz) gives: it exists, but is no file
    with pytest.raises(PrepareError, match="pipe.jsonl: not a regular file or directory; write its contents to a file"):
        prepare([str(pipe)], tmp_path / "out", OPTIONS, progress=False)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}])
    with pytest.raises(PrepareError, match=r"no documents in .*empty.jsonl \(1 empty, 0 malformed lines skipped\)"):
        prepare([str(empty)], tmp_path / "out", OPTIONS, progress=False)
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_command_line(corpus, tmp_path, capsys):
    main([str(corpus), "--output", str(tmp_path / "cli"), "--val_fraction", "0.2", "--shard_bytes", "4000"])
    printed = capsys.readouterr().out
    assert "validation:" in printed and "manifest:" in printed
    assert json.loads((tmp_path / "cli" / MANIFEST).read_text())["options"]["shard_bytes"] == 4000
    with pytest.raises(SystemExit, match="no such file"):
        main([str(tmp_path / "missing"), "--output", str(tmp_path / "x")])


def test_the_command_line_writes_over_nothing_unless_told(corpus, tmp_path):
    out = tmp_path / "out"
    main([str(corpus), "--output", str(out), "--shard_bytes", "4000"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit, match=r"out: not empty; give a new directory, or --overwrite"):
        main([str(corpus), "--output", str(out), "--shard_bytes", "8000"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    main([str(corpus), "--output", str(out), "--shard_bytes", "8000", "--overwrite"])
    assert json.loads((out / MANIFEST).read_text())["options"]["shard_bytes"] == 8000

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("hello")
    with pytest.raises(SystemExit, match=r"texts/shards: inside the input directory .*texts, which would then hold"):
        main([str(texts), "--output", str(texts / "shards")])
    assert [p.name for p in texts.iterdir()] == ["a.txt"]
    main([f"{texts}/**", "--output", str(texts / "shards")])  # a pattern: nothing of the output to match yet
    manifest = (texts / "shards" / MANIFEST).read_bytes()
    with pytest.raises(SystemExit, match=r"manifest.json: an input inside the output directory .*texts/shards"):
        main([f"{texts}/**", "--output", str(texts / "shards"), "--overwrite"])
    assert (texts / "shards" / MANIFEST).read_bytes() == manifest


def test_unreadable_gzip_names_the_file(tmp_path):
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_text('{"text": "not compressed"}\n')
    truncated = write_jsonl(tmp_path / "cut.jsonl.gz", make_documents(50), gz=True)
    truncated.write_bytes(truncated.read_bytes()[:-40])
    for path in (not_gzip, truncated):
        with pytest.raises(PrepareError, match=f"{path.name}: cannot read it"):
            prepare([str(path)], tmp_path / "out", OPTIONS, progress=False)
        assert not list((tmp_path / "out").glob(".*partial"))


def test_long_documents_are_cut_at_line_breaks(tmp_path):
    lines = [f"line {i:04d} of a long text file\n".encode() for i in range(3000)]
    big = tmp_path / "big.txt"
    big.write_bytes(b"".join(lines) + b"x" * 2500)  # ends in a run with no line break
    out = tmp_path / "out"
    options = PrepareOptions(val_fraction=0.0, max_document_bytes=1000)
    manifest = prepare([str(big)], out, options, progress=False)
    keyed = [kv for s in manifest["splits"]["train"]["shards"] for kv in shard_samples(out / s["path"]).items()]
    docs = [data for _, (data, _) in sorted(keyed)]  # keys number documents in input order
    assert b"".join(docs) == big.read_bytes(), "pieces must add up to the file, in order"
    assert max(len(d) for d in docs) <= 1000
    assert all(d.endswith(b"\n") for d in docs[:-3]) and docs[-1] == b"x" * 500


def test_one_large_file_still_gets_every_split(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("".join(f"line {i:05d} of the one file a corpus is\n" for i in range(20000)))
    manifest = prepare([str(big)], tmp_path / "out", PrepareOptions(val_fraction=0.1, test_fraction=0.1,
                                                                     max_document_bytes=4000), progress=False)
    assert set(manifest["splits"]) == {"train", "validation", "test"}


def test_a_rerun_removes_shards_it_no_longer_writes(corpus, tmp_path):
    out = tmp_path / "out"
    many = prepare([str(corpus)], out, OPTIONS, progress=False)
    (out / ".train-000099.tar.partial").write_bytes(b"a shard a killed run began")
    few = prepare([str(corpus)], out, PrepareOptions(val_fraction=0.2, shard_bytes=10**6, interleave=1), progress=False)
    written = {s["path"] for split in few["splits"].values() for s in split["shards"]}
    assert len(written) < sum(len(s["shards"]) for s in many["splits"].values())
    assert {p.name for p in out.glob("*.tar")} == written and not list(out.glob(".*.partial"))
