import json

import pytest
import torch
import yaml
from test_patching import real_documents, real_text, sharp_model

from blt_lightning import calibrate, visualize
from blt_lightning.calibrate import mean_patch_size
from blt_lightning.patching import PatchingConfig
from blt_lightning.vocab import encode


def entropies_of(model, *docs: bytes, window: int = 64):
    """ids [1, N] and entropies [1, N] of documents laid end to end, each streamed on its own."""
    ids = [encode(d) for d in docs]
    return torch.cat(ids)[None], torch.cat([model.document_entropies(i, window) for i in ids])[None]


@pytest.mark.parametrize("mode", ["entropy", "monotonic", "combined"])
@pytest.mark.parametrize("target", [3.0, 4.5, 6.0])
def test_calibration_reaches_its_target_on_held_back_text(mode, target):
    model = sharp_model()
    docs = real_documents(120_000)  # held back as a split would: every other document
    sample, held_back = entropies_of(model, *docs[0::2]), entropies_of(model, *docs[1::2])
    config, achieved = calibrate.calibrate(*sample, PatchingConfig(mode=mode, threshold=0.0), target)
    assert achieved == pytest.approx(target, rel=0.005)
    assert mean_patch_size(*held_back, config) == pytest.approx(target, rel=0.02)


def test_calibrated_in_rows_it_reaches_its_target_in_stage_twos_rows(tmp_path):
    """Stage two patches rows of its seq_len, each seen alone: rows that start inside a document start
    without context. Calibrated in such rows, the threshold gives the target there; calibrated on whole
    documents, it does not."""
    from blt_lightning.evaluate import data_module
    from blt_lightning.patcher import Patcher

    model, seq_len, target = sharp_model(window=64), 48, 4.5
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d.decode()}) + "\n" for d in real_documents(60_000)))
    loader = data_module([str(data)], tmp_path, "test", seq_len, 16, 0)
    loader.prepare_data()
    loader.setup("test")

    def in_stage_two(config: PatchingConfig) -> float:
        patcher, patched, patches = Patcher(config, model, context=64), 0, 0
        for batch in loader.test_dataloader():
            found = patcher(batch["ids"][:, :-1], batch["doc_ids"][:, :-1])
            patched, patches = patched + found.patched_bytes, patches + found.byte_patches
        return patched / patches

    start = PatchingConfig(threshold=0.0)
    for rows, close in ((seq_len, True), (None, False)):
        sample = calibrate.sample_entropies(model, 64, [str(data)], "validation", 10**6, rows)
        config, _ = calibrate.calibrate(*sample, start, target)
        assert (in_stage_two(config) == pytest.approx(target, rel=0.02)) == close


def test_the_sample_is_drawn_from_all_of_the_data_not_its_first_source(tmp_path):
    """Shards keep their inputs' order: a sample of the first documents would hold only the first source."""
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path, letter in ((first, "a"), (second, "b")):
        path.write_text("".join(json.dumps({"text": letter * (50 + i)}) + "\n" for i in range(40)))
    data = [str(first), str(second)]
    sample = calibrate.sample_documents(data, "validation", 1_500)
    sizes = [len(doc) for doc in sample]
    assert sum(sizes) >= 1_500 and sum(sizes) - max(sizes) < 1_500, "just enough whole documents"
    from_first = sum(doc.startswith(b"a") for doc in sample)
    assert 5 <= from_first <= len(sample) - 5, f"{from_first} of {len(sample)} documents from the first file"
    assert sample == sorted(sample, key=lambda doc: (doc[:1], len(doc))), "in the data's order"
    assert sample == calibrate.sample_documents(data, "validation", 1_500), "seeded"
    everything = calibrate.sample_documents(data, "validation", 10**6)
    assert everything == [letter.encode() * (50 + i) for letter in "ab" for i in range(40)]
    with pytest.raises(ValueError, match="sample_bytes must be at least 1, not 0"):
        calibrate.sample_documents(data, "validation", 0)


def test_an_unreachable_target_is_a_clear_error():
    ids, h = entropies_of(sharp_model(), real_text(5_000))
    with pytest.raises(ValueError, match="out of reach"):
        calibrate.calibrate(ids, h, PatchingConfig(threshold=0.0, max_patch_length=4), 6.0)


def test_calibrate_and_patch_commands_on_a_cli_checkpoint(entropy_checkpoint, shards, tmp_path, capsys):
    snippet = tmp_path / "patching.yaml"
    calibrate.main(["--checkpoint", str(entropy_checkpoint), "--data", str(shards / "manifest.json"),
                    "--target", "2.5", "--output", str(snippet)])
    assert "mean patch size" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a calibration is not replaced unless told
        calibrate.main(["--checkpoint", str(entropy_checkpoint), "--data", str(shards / "manifest.json"),
                        "--target", "3", "--output", str(snippet)])
    assert "patching.yaml exists (a calibration?): pass --overwrite to replace it" in capsys.readouterr().err
    calibrate.main(["--checkpoint", str(entropy_checkpoint), "--data", str(shards / "manifest.json"),
                    "--target", "2.5", "--output", str(snippet), "--overwrite"])
    assert f"wrote {snippet}" in capsys.readouterr().out
    config = PatchingConfig(**yaml.safe_load(snippet.read_text())["model"]["init_args"]["patching"])
    assert config.mode == "entropy" and config.threshold > 0

    figure = tmp_path / "patches.png"
    visualize.main(["--checkpoint", str(entropy_checkpoint), "--patching", str(snippet),
                    "--text", "by George R.R. Martin, 字节", "--plot", str(figure)])
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].replace("|", "") == "by George R.R. Martin, 字节"
    assert "patches over 29 bytes" in printed
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="needs --checkpoint"):
        visualize.main(["--mode", "entropy", "--threshold", "1", "--text", "x"])
    with pytest.raises(SystemExit, match="not a stage-one"):
        calibrate.main(["--checkpoint", str(snippet), "--data", str(shards / "manifest.json"), "--target", "3"])


def test_patch_statistics_count_the_bytes_of_patches_as_their_mean_does(capsys):
    visualize.main(["--mode", "static", "--patch_size", "4", "--text", "hello world"])  # [BOS] hell|o wo|rld EOS
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "hell|o wo|rld"
    assert "3 patches over 11 bytes: mean 3.67, median 4, 90th percentile 4, longest 4" in printed
    visualize.main(["--mode", "static", "--patch_size", "4", "--text", "caf\udce9!"])  # the byte 0xe9: not UTF-8
    assert "2 patches over 5 bytes" in capsys.readouterr().out  # c, a, f, 0xe9, !: bytes, not an encoding error


def test_figure_marks_patch_starts():
    ids = encode(b"by George")
    h = torch.full((len(ids),), 0.5)
    starts = torch.zeros(len(ids), dtype=torch.bool)
    starts[[0, 1, 4, 5]] = True
    figure = visualize.patch_figure(ids, h, starts, threshold=1.0, title="test")
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == list("by␣George")
    start_lines = [line for line in axes.lines
                   if line.get_xdata()[0] == line.get_xdata()[-1] and line.get_color() == "tab:red"]
    assert sorted(line.get_xdata()[0] for line in start_lines) == [-0.5, 2.5, 3.5]
