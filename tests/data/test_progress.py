"""ash_lightning.data.progress: a long pass shows what runs, a count and a rate in the style of the trainer's bar
(Lightning's tqdm or rich bar) on a terminal, one line per pass on another stream, and nothing without a bar."""

from __future__ import annotations

import io
import re
import sys
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from ash_lightning.data.fit_pass import FitPass, planned_batches
from ash_lightning.data.progress import pass_summary, progress_in_test_loop, terminal_progress, trainer_progress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SUMMARY = re.compile(r"^fit knn@50 on data\.fit: (\d+)/5 batches in \d+\.\ds \((\d+\.\d|-) batches/s\)(, stopped)?$")


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _trainer(bar: object, rank_zero: bool = True) -> SimpleNamespace:
    return SimpleNamespace(progress_bar_callback=bar, is_global_zero=rank_zero)


def _fit(progress, fail_at: int | None = None) -> int:
    """A fit pass of 5 batches (20 samples in batches of 4) of knn@50 on data.fit, shown by ``progress``."""
    loader = DataLoader(TensorDataset(torch.rand(20, 3), torch.zeros(20, dtype=torch.long)), batch_size=4)
    taken: list[int] = []

    def take(batch) -> None:
        if len(taken) == fail_at:
            raise KeyboardInterrupt
        taken.append(len(batch.images))

    fit = FitPass(lambda: loader, data_name="data.fit", progress=progress)
    return fit.run(torch.nn.Identity(), take, what="knn@50", no_data="-")


def _rich_bar(stream: io.StringIO, **console: object) -> RichProgressBar:
    return RichProgressBar(console_kwargs={"file": stream, "width": 200, **console})


def test_tqdm_bar_on_a_terminal_shows_description_count_and_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)  # where Lightning's tqdm bars draw
    assert _fit(trainer_progress(_trainer(TQDMProgressBar()))) == 20
    final = terminal.getvalue().split("\r")[-1]
    assert re.search(r"fit knn@50 on data\.fit: 100%.*\b5/5 \[.*\d+\.\d+it/s", final), terminal.getvalue()


def test_rich_bar_on_a_terminal_shows_description_count_and_rate() -> None:
    terminal = Terminal()
    assert _fit(trainer_progress(_trainer(_rich_bar(terminal, force_terminal=True)))) == 20  # a display of its own
    shown = ANSI.sub("", terminal.getvalue())
    assert re.search(r"fit knn@50 on data\.fit\s+━+\s+5/5\s.*\d+\.\d+it/s", shown), shown


def test_rich_bar_that_runs_gets_a_task_of_its_display() -> None:
    from rich.console import Console
    from rich.progress import Progress

    terminal = Terminal()
    bar = _rich_bar(terminal, force_terminal=True)
    trainer = _trainer(bar)
    bar.progress = running = Progress(*bar.configure_columns(trainer), console=Console(file=terminal))
    with running:
        _fit(trainer_progress(trainer))
        (task,) = running.tasks
    assert (task.description, task.completed, task.total) == ("fit knn@50 on data.fit", 5, 5)


BUILD = "test dark and cache its features (67 samples)"


def test_a_pass_inside_the_test_loop_renames_the_running_tqdm_test_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", Terminal())
    bar = TQDMProgressBar()
    with progress_in_test_loop(_trainer(bar))(BUILD, None):  # before the test bar exists: nothing to rename
        pass
    bar.test_progress_bar = test_bar = bar.init_test_tqdm()
    test_bar.set_description("Testing DataLoader 1")
    with progress_in_test_loop(_trainer(bar))(BUILD, None) as advance:
        advance()
    assert test_bar.desc == f"{BUILD}: " and test_bar.n == 0  # the trainer's bar counts the batches itself


def test_a_pass_inside_the_test_loop_renames_the_running_rich_test_bar() -> None:
    from rich.console import Console
    from rich.progress import Progress

    terminal = Terminal()
    bar = _rich_bar(terminal, force_terminal=True)
    trainer = _trainer(bar)
    bar.progress = Progress(*bar.configure_columns(trainer), console=Console(file=terminal, force_terminal=True))
    bar.test_progress_bar_id = bar.progress.add_task("Testing", total=5)
    with progress_in_test_loop(trainer)(BUILD, None):
        pass
    (task,) = bar.progress.tasks
    assert (task.description, task.completed) == (BUILD, 0)


@pytest.mark.parametrize("kind", ["tqdm", "rich"])
def test_another_stream_gets_one_line_per_pass(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(sys, "stdout", log)
    progress = trainer_progress(_trainer(TQDMProgressBar() if kind == "tqdm" else _rich_bar(log)))
    _fit(progress)
    (line,) = log.getvalue().splitlines()
    assert SUMMARY.match(line).group(1) == "5", line
    with pytest.raises(KeyboardInterrupt):
        _fit(progress, fail_at=2)
    (_, stopped) = log.getvalue().splitlines()
    assert SUMMARY.match(stopped).group(1, 3) == ("2", ", stopped"), stopped


def test_nothing_without_a_bar_on_other_ranks_or_at_refresh_rate_0(capsys: pytest.CaptureFixture[str]) -> None:
    for trainer in (_trainer(None), _trainer(TQDMProgressBar(), rank_zero=False), _trainer(TQDMProgressBar(0))):
        assert _fit(trainer_progress(trainer)) == 20
    assert capsys.readouterr() == ("", "")


def test_without_a_trainer_the_line_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    _fit(terminal_progress())
    out, err = capsys.readouterr()
    assert out == "" and SUMMARY.match(err.strip())


def test_summary_and_planned_batches() -> None:
    assert pass_summary("OOD a", 3, None, 1.5) == "OOD a: 3 batches in 1.5s (2.0 batches/s)"
    loader = DataLoader(TensorDataset(torch.rand(10)), batch_size=4)
    assert [planned_batches(loader, m) for m in (None, 1, 5, 100)] == [3, 1, 2, 3]
    assert planned_batches((batch for batch in loader), None) is None
