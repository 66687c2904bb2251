"""What every byte LM's LightningModule shares (blt_lightning/training.py): its throughput clocks."""

import logging
import re
from types import SimpleNamespace

import lightning as L
import pytest
from test_resume import tiny_fit

from blt_lightning import training


def test_throughput_leaves_out_validation_and_the_checkpoints_saved_after_it(shards, monkeypatch, caplog):
    """On a stand-in clock a training batch takes 1 s, a validation batch 100 s and the save after a validation
    1,000 s: the bytes per second logged after every batch and the total at the end count the training batches'
    seconds alone."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: clock.now))

    class Timeline(L.Callback):
        batch_bytes, rates = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.now += 1.0
            self.batch_bytes.append(batch["bytes"])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rates.append(trainer.callback_metrics.get("train/bytes_per_sec"))

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            clock.now += 100.0

        def on_validation_end(self, trainer, pl_module):
            clock.now += 1000.0

    timeline = Timeline()
    module, data, trainer = tiny_fit(shards, [timeline], max_steps=7, val_check_interval=2, limit_val_batches=2)
    with caplog.at_level(logging.INFO):
        trainer.fit(module, data)

    sizes = timeline.batch_bytes
    assert len(sizes) == 7
    assert timeline.rates[0] is None  # one batch has no duration yet
    # After batch i (0-based), the window's batches after its first, over the i seconds since the first began.
    expected = [sum(sizes[1 : i + 1]) / i for i in range(1, 7)]
    assert [float(r) for r in timeline.rates[1:]] == pytest.approx(expected, rel=1e-6)  # logged as float32
    reported = re.search(r"trained at ([\d,]+) bytes/s \(([\d,]+) bytes in ([\d.]+) s", caplog.text)
    assert reported.groups() == (f"{round(sum(sizes[1:]) / 6):,}", f"{sum(sizes[1:]):,}", "6.0")
