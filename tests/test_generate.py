import io
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from blt_lightning.cli import main
from blt_lightning.generate import BLTByteStream, ChunkPatcher, EntropyModelByteStream, Sampling, generate, load, sample
from blt_lightning.models import EntropyModel, EntropyModelConfig
from blt_lightning.models.blt import BLTConfig, ByteLatentTransformer
from blt_lightning.models.blt_stream import BLTStream
from blt_lightning.patcher import Patcher, entropy_window
from blt_lightning.patching import PatchingConfig
from blt_lightning.vocab import BOS, EOS, OFFSET, PAD, RESERVED, VOCAB_SIZE, encode

# Two encoder layers (so pooling after every layer differs from after the last), a window of 8 bytes.
TINY = BLTConfig(encoder_dim=32, encoder_layers=2, encoder_heads=2, global_dim=64, global_layers=2, global_heads=4,
                 decoder_dim=32, decoder_layers=2, decoder_heads=2, local_window=8, ngram_sizes=(3, 4, 5),
                 ngram_table_size=101, ffn_multiple_of=16)
MODELS = {
    "ngrams": TINY,
    "cross-attn-flipped-doubled": replace(TINY, encoder_cross_attn_all_layers=True, decoder_cross_attn_all_layers=False,
                                          doubled_cross_attn_residual=True),
    "no-ngrams-no-window-k1": replace(TINY, ngram_sizes=(), local_window=None, cross_attn_k=1),
}
THRESHOLD = 3.45  # about the median entropy of the entropy model below on text: patches of 1 to 10 bytes
MODES = [
    PatchingConfig(mode="static", patch_size=3),
    PatchingConfig(mode="space"),
    PatchingConfig(threshold=THRESHOLD),
    PatchingConfig(threshold=THRESHOLD, max_patch_length=3),
    PatchingConfig(mode="monotonic", relative_threshold=0.2),
]
PROMPT = b"The quick brown fox, longer than the window"
GREEDY = Sampling(temperature=0)


def entropy_model(window: int | None = 8, seed: int = 100) -> EntropyModel:
    torch.manual_seed(seed)
    model = EntropyModel(EntropyModelConfig(dim=16, n_layers=1, n_heads=2, sliding_window=window)).eval()
    with torch.no_grad():
        model.output.weight.mul_(30.0)  # entropies spread out, as a trained model's do
    return model


def blt(config: BLTConfig = TINY, seed: int = 0) -> ByteLatentTransformer:
    torch.manual_seed(seed)
    return ByteLatentTransformer(config).eval()


def full_logits(model: ByteLatentTransformer, patcher: Patcher, ids: list[int]) -> torch.Tensor:
    """[L, VOCAB_SIZE]: one uncached pass over the whole row, patched by the batch patcher."""
    row = torch.tensor([ids])
    with torch.no_grad():
        return model(row, patcher(row))[0]


@pytest.mark.parametrize("config", MODES, ids=lambda c: f"{c.mode}-{c.max_patch_length}")
@pytest.mark.parametrize("name", MODELS)
def test_cached_greedy_generation_is_the_argmax_of_full_passes(name, config):
    """At every step, the byte the caches chose is the argmax of a full pass over the row so far: position t
    of one pass over the final row (a later byte never changes earlier logits: test_blt_model). The row ends
    one byte later: at a row's last position the decoder reads its own patch, complete or not."""
    model, patcher = blt(MODELS[name]), Patcher(config, entropy_model(), context=32)
    generated = list(generate(BLTByteStream(model, patcher), PROMPT, 40, GREEDY))
    ids = encode(PROMPT)[:-1].tolist() + [b + OFFSET for b in generated]
    logits = full_logits(model, patcher, ids + [EOS])
    first = len(ids) - len(generated) - 1
    assert [sample(logits[t], GREEDY, None) for t in range(first, len(ids) - 1)] == ids[first + 1 :]
    if len(generated) < 40:
        assert sample(logits[len(ids) - 1], GREEDY, None) == EOS
    lengths = patcher(torch.tensor([ids])).lengths[0]
    assert len(generated) > 5 and lengths.max() > 2 and len(lengths.unique()) > 1, "a test of patches needs patches"


@pytest.mark.parametrize("name, config", [("cross-attn-flipped-doubled", MODES[3]), ("ngrams", MODES[1])])
def test_each_step_is_the_argmax_of_a_full_pass_over_the_row_so_far(name, config):
    """The same, step by step: a full pass over the ids so far and one more byte (which byte does not matter:
    whether it starts a patch does not depend on it), read at the position before that byte."""
    model, patcher = blt(MODELS[name]), Patcher(config, entropy_model(), context=32)
    stream = BLTByteStream(model, patcher)
    ids = encode(PROMPT)[:-1].tolist()
    logits = stream.feed(ids)
    for _ in range(12):
        expected = full_logits(model, patcher, ids + [OFFSET])[-2]
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
        ids.append(sample(expected, GREEDY, None))
        assert sample(logits, GREEDY, None) == ids[-1]
        if ids[-1] == EOS:
            break
        logits = stream.feed(ids[-1:])


@pytest.mark.parametrize("config", MODES, ids=lambda c: f"{c.mode}-{c.max_patch_length}")
def test_any_chunking_gives_the_logits_of_one_pass(config):
    """A document fed in chunks of any size (a chunk may complete several patches, or none) gives the logits
    of one uncached pass at every position, the row's last included (Patches.next_starts)."""
    model, patcher = blt(MODELS["cross-attn-flipped-doubled"]), Patcher(config, entropy_model(), context=32)
    ids = encode(b"Chunks of 1, 5, 2, 17 and the rest: patches end inside them and across them.")[:-1].tolist()
    expected = full_logits(model, patcher, ids)
    stream, patching = BLTStream(model), ChunkPatcher(patcher)
    got = []
    for a, b in zip([0, 1, 6, 8, 25], [1, 6, 8, 25, len(ids)]):
        starts = patching.extend(ids[a:b])
        got.append(stream.feed(ids[a:b], starts, patching.next_starts_patch(OFFSET)))
    torch.testing.assert_close(torch.cat(got), expected, rtol=0, atol=1e-4)


def test_a_stream_holds_one_document():
    stream = BLTStream(blt())
    stream.feed([BOS, 70], [True, True], True)
    with pytest.raises(ValueError, match="one document"):
        stream.feed([BOS], [True], True)
    with pytest.raises(ValueError, match="one document"):
        stream.feed([70, EOS, 71], [True, False, True], True)
    stream.feed([EOS], [True], False)
    with pytest.raises(ValueError, match="one document"):
        stream.feed([70], [True], True)


def test_the_entropy_model_generates_through_its_cache():
    model = entropy_model(window=None)
    window = entropy_window(model.config, 12)  # shorter than prompt and generation: the cache drops keys
    generated = list(generate(EntropyModelByteStream(model, window), PROMPT, 30, GREEDY))
    ids = encode(PROMPT)[:-1].tolist() + [b + OFFSET for b in generated]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), window=window)[0]
    first = len(ids) - len(generated) - 1
    assert len(generated) > 10
    assert [sample(logits[t], GREEDY, None) for t in range(first, len(ids) - 1)] == ids[first + 1 :]


def test_sampling_options():
    model, patcher = blt(), Patcher(PatchingConfig(mode="space"))
    run = lambda sampling, seed=None: bytes(generate(BLTByteStream(model, patcher), b"seed", 24, sampling, seed))
    greedy = run(GREEDY)
    assert run(Sampling(temperature=1.0, top_k=1), seed=3) == greedy
    assert run(Sampling(temperature=2.0, top_p=1e-6), seed=4) == greedy
    assert run(Sampling(temperature=1.0), seed=7) == run(Sampling(temperature=1.0), seed=7)
    assert run(Sampling(temperature=1.0), seed=7) != run(Sampling(temperature=1.0), seed=8)
    assert run(Sampling(temperature=1.0, top_k=5, top_p=0.9), seed=1) != greedy
    assert run(Sampling(temperature=1e-45), seed=2) == greedy  # the smallest float32: no inf - inf, no NaN


def test_top_p_of_one_keeps_every_id(monkeypatch):
    """Also where the float32 running sum of the sorted probabilities reaches 1 before the last id."""
    drawn_from = []
    monkeypatch.setattr(torch, "multinomial", lambda probs, n, generator=None: drawn_from.append(probs) or OFFSET)
    logits = torch.randn(VOCAB_SIZE, generator=torch.Generator().manual_seed(0)) * 8  # peaked: the sum gets there
    sample(logits, Sampling(top_p=1.0), None)
    sample(logits, Sampling(), None)
    assert torch.equal(*drawn_from)


def test_sampling_never_draws_padding_bos_or_the_reserved_id():
    logits = torch.zeros(VOCAB_SIZE)
    logits[[PAD, BOS, RESERVED]] = 100.0
    g = torch.Generator().manual_seed(0)
    drawn = {sample(logits, Sampling(temperature=t, top_k=k), g) for t in (0, 1.0) for k in (None, 2) for _ in range(9)}
    assert not drawn & {PAD, BOS, RESERVED}
    top = torch.arange(VOCAB_SIZE, dtype=torch.float)
    assert {sample(top, Sampling(top_k=3), g) for _ in range(100)} == {VOCAB_SIZE - 3, VOCAB_SIZE - 2, VOCAB_SIZE - 1}


def cli(capsysbinary, *args: str) -> tuple[bytes, str]:
    main(["generate", *args])
    captured = capsysbinary.readouterr()
    return captured.out, captured.err.decode()


@pytest.mark.parametrize("which", ["blt", "entropy"])
def test_cli_generates_from_either_stage(which, blt_checkpoint, entropy_checkpoint, capsysbinary):
    checkpoint = blt_checkpoint if which == "blt" else entropy_checkpoint
    out, err = cli(capsysbinary, "--checkpoint", str(checkpoint), "--prompt", "doc 3: the", "--max-bytes", "40",
                   "--temperature", "0")
    expected = bytes(generate(load(checkpoint)(), b"doc 3: the", 40, GREEDY))
    assert out == expected + b"\n"  # the bytes, not their decoding
    assert f"{len(expected)} bytes in " in err and "bytes/s" in err
    # A prompt that is not UTF-8 (Python holds its bytes as surrogates) is continued as the bytes given.
    invalid, _ = cli(capsysbinary, "--checkpoint", str(checkpoint), "--prompt", "caf\udce9", "--max-bytes", "8",
                     "--temperature", "0")
    assert invalid == bytes(generate(load(checkpoint)(), b"caf\xe9", 8, GREEDY)) + b"\n"
    sampled, _ = cli(capsysbinary, "--checkpoint", str(checkpoint), "--max-bytes", "40", "--top-k", "20", "--top-p", "0.9",
                     "--temperature", "0.8", "--seed", "5")
    assert sampled == cli(capsysbinary, "--checkpoint", str(checkpoint), "--max-bytes", "40", "--top_k", "20", "--top_p",
                          "0.9", "--temperature", "0.8", "--seed", "5")[0]


def test_a_stage_two_checkpoint_generates_without_its_stage_one_file(blt_checkpoint, tmp_path, capsysbinary):
    ckpt = torch.load(blt_checkpoint, weights_only=False)
    ckpt["hyper_parameters"]["entropy_checkpoint"] = str(tmp_path / "moved" / "entropy.ckpt")
    moved = tmp_path / "stage_two.ckpt"
    torch.save(ckpt, moved)
    args = ("--prompt", "doc 1", "--max-bytes", "30", "--temperature", "0")
    moved_out, _ = cli(capsysbinary, "--checkpoint", str(moved), *args)
    assert moved_out == cli(capsysbinary, "--checkpoint", str(blt_checkpoint), *args)[0]


def test_cli_errors_name_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit, match="nope.ckpt: no checkpoint here"):
        main(["generate", "--checkpoint", str(tmp_path / "nope.ckpt")])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="garbage.ckpt: not a checkpoint"):
        main(["generate", "--checkpoint", str(garbage)])
    capsys.readouterr()
    for option, value, named in (("--top-p", "0", "--top-p 0.0: more than 0"), ("--top-k", "0", "--top-k 0: from 1"),
                                 ("--temperature", "nan", "--temperature nan: a finite"),
                                 ("--max-bytes", "-1", "--max-bytes -1: 0 or more")):
        with pytest.raises(SystemExit):
            main(["generate", "--checkpoint", str(garbage), option, value])
        message = capsys.readouterr().err.split("error:")[-1]
        assert named in message and message.count("--") == 1, "the option at fault, and only it, is named"


def test_output_piped_to_a_reader_that_stops_ends_quietly(entropy_checkpoint):
    """`generate ... | head -c 5`: no BrokenPipeError traceback, as Unix tools end."""
    piped = subprocess.run(f"{sys.executable} -m blt_lightning generate --checkpoint {entropy_checkpoint} --max-bytes "
                           "4000 --temperature 0 | head -c 5", shell=True, capture_output=True,
                           cwd=Path(__file__).resolve().parents[1])
    errors = piped.stderr.decode(errors="replace")
    assert len(piped.stdout) == 5 and "bytes/s" not in errors, "stopped at the broken pipe"
    assert "Traceback" not in errors and "BrokenPipe" not in errors


def test_a_stdout_of_text_alone_gets_the_bytes_decoded(entropy_checkpoint, monkeypatch):
    text = io.StringIO()
    monkeypatch.setattr(sys, "stdout", text)
    main(["generate", "--checkpoint", str(entropy_checkpoint), "--max-bytes", "12", "--temperature", "0"])
    expected = bytes(generate(load(entropy_checkpoint)(), b"", 12, GREEDY))
    assert text.getvalue() == expected.decode("utf-8", "replace") + "\n"
