"""The callbacks' long passes (calibration on ID data, the detectors' fit, each OOD set of ``ood=``) follow the
trainer's progress bar: on a terminal each shows what runs, its batches and a rate in the bar's style (tqdm or
rich); on a log stream each writes one line; with ``enable_progress_bar=False`` nothing."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import rich
import torch
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ash_lightning.callbacks import ActivationShapingCallback, OODMetricsCallback
from tests.data.test_progress import ANSI, Terminal

# 40 fit samples in batches of 8, 24 OOD samples in batches of 8
PASSES = {
    "fit react@p90 on fit_dataloader": 5,
    "fit knn@5 under none, react@p90 on fit_dataloader": 5,
    "OOD shifted": 3,
}


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def test_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])


def _test(bar: object | None, out: Path) -> None:
    """A sweep [none, react@p90] x [energy, knn@5] fitted on its own fit_dataloader, with one OOD set."""
    torch.manual_seed(1)
    fit = DataLoader(TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,))), batch_size=8)
    id_set = TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,)))
    ood = TensorDataset(torch.randn(24, 6) + 3, torch.zeros(24, dtype=torch.long))
    callbacks = [
        ActivationShapingCallback(["none", "react@p90"], fit_dataloader=fit),
        OODMetricsCallback(
            score=["energy", "knn@5"], fit_dataloader=fit, ood={"shifted": ood}, output_dir=str(out), log_figures=False
        ),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_model_summary=False,
        enable_progress_bar=bar is not None,
        callbacks=[*callbacks, *([bar] if bar is not None else [])],
    )
    trainer.test(Model(), DataLoader(id_set, batch_size=8), verbose=False)


@pytest.fixture
def rich_console_restored():
    yield
    rich.reconfigure()  # RichProgressBar(console_kwargs=...) reconfigured rich's global console


@pytest.mark.parametrize("kind", ["tqdm", "rich"])
def test_on_a_terminal_each_pass_shows_its_bar(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rich_console_restored: None
) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    console = {"file": terminal, "force_terminal": True, "width": 200}
    bar = TQDMProgressBar() if kind == "tqdm" else RichProgressBar(console_kwargs=console)
    _test(bar, tmp_path)
    shown = ANSI.sub("", terminal.getvalue())
    for description, batches in PASSES.items():
        counted = rf"{re.escape(description)}(?::\s+100%\S*|\s+━+)\s+{batches}/{batches}\s.*?\d+\.\d+it/s"
        assert re.search(counted, shown), (description, shown[-3000:])


@pytest.mark.parametrize("kind", ["tqdm", "rich"])
def test_on_a_log_stream_each_pass_writes_one_line(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rich_console_restored: None
) -> None:
    log = io.StringIO()
    monkeypatch.setattr(sys, "stdout", log)
    _test(TQDMProgressBar() if kind == "tqdm" else RichProgressBar(console_kwargs={"file": log}), tmp_path)
    lines = ANSI.sub("", log.getvalue()).replace("\r", "\n").splitlines()
    for description, batches in PASSES.items():
        ours = [line for line in lines if line.startswith(f"{description}:")]
        assert len(ours) == 1 and ours[0].startswith(f"{description}: {batches}/{batches} batches in "), lines


def test_without_the_trainers_bar_nothing_is_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _test(None, tmp_path)
    out, err = capsys.readouterr()
    assert not any(description in out + err for description in PASSES), out + err
