"""Rebuild data/corpus/ from ../shared/corpora: a fixed, documented slice of each chosen source.

Run from the repository root with the shared corpora beside it:  python data/build_corpus.py
Documents are taken evenly spaced through each source until the source's byte budget is met, then cut
at line breaks into pieces of at most PIECE bytes, so that a hash split of a few percent still draws
from every source. The selection depends only on the source files, so a rebuild gives the same corpus.
"""

import gzip
import json
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "corpora"
OUT = Path(__file__).resolve().parent / "corpus"
PIECE = 4096

BUDGETS = {  # source -> bytes of text to take
    "en_austen": 1_200_000,
    "en_moby_dick": 500_000,
    "en_web_bible": 400_000,
    "he_bible": 400_000,
    "fa_hafez": 300_000,
    "hi_ui": 300_000,
    "ru_man": 400_000,
    "zh_man": 400_000,
    "ja_man": 400_000,
    "py_stdlib": 300_000,
}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, budget in BUDGETS.items():
        with gzip.open(SHARED / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
        mean = sum(len(d["text"].encode()) for d in docs) / len(docs)
        step = max(1, int(len(docs) * mean / budget))
        taken, size = [], 0
        for doc in docs[::step]:
            n = len(doc["text"].encode())
            if size + n > budget * 1.1 or n > budget / 2:
                continue
            taken.append(doc)
            size += n
            if size >= budget:
                break
        # mtime=0 keeps the gzip bytes identical across rebuilds
        with open(OUT / f"{name}.jsonl.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            pieces = [piece for doc in taken for piece in cut(doc["text"])]
            for piece in pieces:
                gz.write((json.dumps({"text": piece, "source": name, "lang": taken[0]["lang"]}, ensure_ascii=False)
                          + "\n").encode())
        print(f"{name}: {len(pieces)} documents, {size:,} bytes", file=sys.stderr)


def cut(text: str) -> list[str]:
    """Pieces of at most PIECE bytes, ending at line breaks (a longer line is a piece of its own)."""
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode())
        if current and size + n > PIECE:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += n
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


if __name__ == "__main__":
    main()
