"""The OOD sets of ``OODMetricsCallback(ood=...)`` under Lightning's RichProgressBar (the Hydra template's default
bar) on a terminal: each set is a task of the trainer's own rich bar, advanced once per batch, and the results equal
those under the tqdm bar."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ash_lightning.callbacks import ActivationShapingCallback, OODMetricsCallback

L = pytest.importorskip("lightning")
rich = pytest.importorskip("rich")
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar  # noqa: E402


class Model(L.LightningModule):
    """A user's module: ``test_step`` without ``dataloader_idx``, logging its loss and returning nothing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", nn.functional.cross_entropy(self(x), y))


class SpyRich(RichProgressBar):
    """RichProgressBar on a terminal recording the tasks added to its progress display and how often each advanced."""

    def __init__(self) -> None:
        super().__init__(console_kwargs={"force_terminal": True})
        self.tasks: dict[str, int] = {}

    def _init_progress(self, trainer) -> None:
        super()._init_progress(trainer)
        progress, spy = self.progress, self
        if progress is None or getattr(progress, "_spied", False):
            return
        add_task, update = progress.add_task, progress.update
        names: dict[int, str] = {}

        def spy_add(description, *args, **kwargs):
            task = add_task(description, *args, **kwargs)
            names[task] = str(description)
            spy.tasks.setdefault(str(description), 0)
            return task

        def spy_update(task, *args, **kwargs):
            if kwargs.get("advance") and task in names:
                spy.tasks[names[task]] += kwargs["advance"]
            return update(task, *args, **kwargs)

        progress.add_task, progress.update, progress._spied = spy_add, spy_update, True


def _run(bar, out: Path) -> dict:
    torch.manual_seed(1)
    id_set = TensorDataset(torch.randn(64, 12), torch.randint(0, 3, (64,)))
    ood = TensorDataset(torch.randn(40, 12) + 3, torch.zeros(40, dtype=torch.long))
    metrics = OODMetricsCallback(ood={"shifted": ood}, batch_size=8, output_dir=str(out), log_figures=False)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, callbacks=[bar, ActivationShapingCallback("ash_s@90"), metrics]
    )
    trainer.test(Model(), DataLoader(id_set, batch_size=16), verbose=False)
    return metrics.results["runs"][0]["ood"]["shifted"]


def test_ood_sets_show_on_the_rich_bar_and_equal_the_tqdm_results(tmp_path: Path) -> None:
    rich_bar = SpyRich()
    try:
        with_rich = _run(rich_bar, tmp_path / "rich")
    finally:
        rich.reconfigure()  # the bar made rich's global console a terminal
    assert rich_bar.tasks.get("OOD shifted") == 5  # 40 samples in batches of 8
    assert with_rich == _run(TQDMProgressBar(), tmp_path / "tqdm")
