"""`generate`: text from a trained checkpoint, a byte at a time, every model behind a KV cache.

- A stage-two (BLTLM) checkpoint generates through BLTStream: the local models advance by one byte, the
  global model by one patch when a patch completes. Its patches are decided as the text grows, by the
  patcher's incremental form, the entropy model (in the entropy modes) streamed through its own cache.
- A stage-one (EntropyLM) checkpoint is a byte LM too, and generates through its cache.
Both load with loading.load_lm: a stage-two checkpoint carries its entropy model, so the stage-one file
it was trained with need not exist any more.

A prompt is the start of a document, as in training: BOS, then its bytes. Generation never picks PAD,
BOS or the reserved id, so the document it writes is bytes to the end: EOS, or --max-bytes bytes.

    blt-lightning generate --checkpoint runs/blt-tiny/version_0/checkpoints/last.ckpt --prompt "Call me"
"""

import codecs
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .blt_lm import BLTLM
from .loading import load_lm
from .models import EntropyModel
from .models.blt import ByteLatentTransformer
from .models.blt_stream import BLTStream
from .models.entropy import entropy_of
from .patcher import IncrementalPatcher, Patcher, entropy_window
from .tool_parser import ToolParser
from .vocab import BOS, EOS, OFFSET, PAD, RESERVED, VOCAB_SIZE, encode

NEVER_SAMPLED = [PAD, BOS, RESERVED]


@dataclass(frozen=True)
class Sampling:
    """How the next id is drawn from the model's logits."""

    temperature: float = 1.0
    """Logits are divided by it; 0 picks the most likely id (greedy)."""
    top_k: int | None = None
    """Draw among the k most likely ids only."""
    top_p: float | None = None
    """Draw among the most likely ids whose probabilities sum to p (nucleus sampling)."""


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next id from logits [VOCAB_SIZE]."""
    logits = logits.float().clone()
    logits[NEVER_SAMPLED] = float("-inf")
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = (logits - logits.max()) / sampling.temperature  # the largest at 0: a tiny temperature makes no inf - inf
    if sampling.top_k is not None:
        logits[logits < logits.topk(sampling.top_k).values[-1]] = float("-inf")
    if sampling.top_p is not None and sampling.top_p < 1:  # at 1 every id: float32 sums may reach 1 before the last
        ordered, order = logits.sort(descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs >= sampling.top_p  # the ids before it already hold p (never the first)
        logits[order[outside]] = float("-inf")
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


class ByteStream(Protocol):
    def feed(self, ids: list[int]) -> torch.Tensor:
        """Logits [VOCAB_SIZE] for the id after `ids`, the next ids of the document."""


class ChunkPatcher(IncrementalPatcher):
    """The incremental patcher fed a chunk of ids at a time (a prompt, then one id): the chunk's entropies
    come from one pass of the entropy model over all of it, through its cache, not from a pass per id."""

    def extend(self, ids: list[int]) -> list[bool]:
        """Feed the next ids; which of them start a patch."""
        if self.config.needs_entropies:
            model = self.patcher.model
            if self.cache is None or ids[0] == BOS:
                self.cache = model.new_cache(self.patcher.window)
            with torch.inference_mode():
                logits = model.forward_cached(torch.tensor([ids], device=model.output.weight.device), self.cache)
            self._entropies = iter(entropy_of(logits)[0].tolist())
        return [self.append(i) for i in ids]

    def _entropy(self, next_id: int) -> float:
        return next(self._entropies)


class BLTByteStream:
    """One document through a Byte Latent Transformer, patched as it grows."""

    def __init__(self, model: ByteLatentTransformer, patcher: Patcher):
        self.stream, self.patching = BLTStream(model), ChunkPatcher(patcher)

    def feed(self, ids: list[int]) -> torch.Tensor:
        starts = self.patching.extend(ids)
        # Whether the next id starts a patch: the same for every byte and EOS (only BOS and PAD, never
        # generated, would change it), so it is known before the id is drawn.
        next_starts = self.patching.next_starts_patch(OFFSET)
        return self.stream.feed(ids, starts, next_starts)[-1]


class EntropyModelByteStream:
    """One document through the entropy model, within the attention window it was trained with."""

    def __init__(self, model: EntropyModel, window: int):
        self.model, self.cache = model, model.new_cache(window)

    @torch.inference_mode()
    def feed(self, ids: list[int]) -> torch.Tensor:
        return self.model.forward_cached(torch.tensor([ids], device=self.model.output.weight.device), self.cache)[0, -1]


def generate(stream: ByteStream, prompt: bytes, max_bytes: int, sampling: Sampling,
             seed: int | None = None) -> Iterator[int]:
    """The bytes that follow `prompt` (a document's beginning), as they are drawn: until EOS, at most max_bytes."""
    logits = stream.feed(encode(prompt)[:-1].tolist())  # BOS and the prompt's bytes, not its EOS
    generator = torch.Generator(logits.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    for n in range(max_bytes):
        next_id = sample(logits, sampling, generator)
        if next_id == EOS:
            return
        yield next_id - OFFSET
        if n + 1 < max_bytes:
            logits = stream.feed([next_id])


def load(checkpoint: str | Path, device: str | torch.device = "cpu") -> Callable[[], ByteStream]:
    """What makes streams of a stage-two or stage-one checkpoint: a new one for each document."""
    lm = load_lm(checkpoint, device)
    if isinstance(lm, BLTLM):
        return lambda: BLTByteStream(lm.model, lm.patcher)
    return lambda: EntropyModelByteStream(lm.model, entropy_window(lm.model.config, lm.seq_len))


class _Decoding:
    """Bytes written to a text stream, decoded as UTF-8 (U+FFFD for what is not)."""

    def __init__(self, text):
        self.text, self.decoder = text, codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, data: bytes) -> None:
        self.text.write(self.decoder.decode(data))  # the closing b"\n" ends any sequence left open

    def flush(self) -> None:
        self.text.flush()


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser(prog="blt-lightning generate",
                        description="Generate text from a BLTLM or EntropyLM checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="stage-two (BLTLM) or stage-one (EntropyLM) checkpoint")
    parser.add_argument("--prompt", default="", help="the text to continue (default: none, a document from its start)")
    parser.add_argument("--max-bytes", type=int, default=256,
                        help="bytes to generate at most (default: 256)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="0: the most likely byte every time (default: 1)")
    parser.add_argument("--top-k", type=int, default=None, help="draw among the k most likely bytes only")
    parser.add_argument("--top-p", type=float, default=None,
                        help="draw among the most likely bytes holding p of the probability")
    parser.add_argument("--seed", type=int, default=None, help="seed of the draws (default: a random one)")
    parser.add_device_argument()
    args = parser.parse_args(argv)
    for wrong, problem in (
        (not 0 <= args.temperature < math.inf, f"--temperature {args.temperature}: a finite 0 or more"),
        (args.max_bytes < 0, f"--max-bytes {args.max_bytes}: 0 or more"),
        (args.top_k is not None and not 1 <= args.top_k <= VOCAB_SIZE, f"--top-k {args.top_k}: from 1 to {VOCAB_SIZE}"),
        (args.top_p is not None and not 0 < args.top_p <= 1, f"--top-p {args.top_p}: more than 0, at most 1"),
    ):
        if wrong:
            parser.error(problem)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    try:
        new_stream = load(args.checkpoint, args.device)
    except (ValueError, OSError) as error:
        sys.exit(f"generate: {error}")
    # the bytes themselves, as the model made them: invalid UTF-8 is data here too (a stdout of text alone, such as
    # a StringIO, gets them decoded)
    out = getattr(sys.stdout, "buffer", None) or _Decoding(sys.stdout)
    start, n = time.perf_counter(), 0
    for n, byte in enumerate(generate(new_stream(), os.fsencode(args.prompt), args.max_bytes, sampling, args.seed), 1):
        out.write(bytes([byte]))
        out.flush()
    out.write(b"\n")
    out.flush()
    seconds = time.perf_counter() - start  # the prompt's pass included
    print(f"{n:,} bytes in {seconds:.2f} s: {n / seconds:,.1f} bytes/s", file=sys.stderr)
