"""Progress of a long pass over batches (a fit pass over ID data, an OOD set that ``OODMetricsCallback`` scores),
shown in the style of the trainer's own progress bar.

A ``PassProgress`` shows one pass: ``with progress(description, total) as advance:`` for a pass of ``total`` batches
(None: unknown), ``description`` naming what runs on which data (``fit knn@50 on data.fit``); ``advance()`` counts
one batch.

* ``trainer_progress(trainer)`` follows the trainer's bar, looked up when each pass starts. Without one
  (``enable_progress_bar=False``, a rank other than global rank 0, a refresh rate of 0) nothing is shown. Lightning's
  ``TQDMProgressBar`` gives a bar made by its ``init_test_tqdm`` (on stdout: description, count, times, rate);
  ``RichProgressBar`` a task with its columns, in its running display or, before it runs, in a display of its own.
* ``terminal_progress()``: the same without a trainer, as a tqdm bar on stderr.
* ``no_progress``: nothing.

Where the bar's stream is not a terminal (a log file, a pipe) a pass writes one line instead, when it ends
(``pass_summary``): ``fit knn@50 on data.fit: 500/500 batches in 12.3s (40.6 batches/s)``.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TextIO

__all__ = ["Advance", "PassProgress", "no_progress", "pass_summary", "terminal_progress", "trainer_progress"]

Advance = Callable[[], None]
PassProgress = Callable[[str, int | None], AbstractContextManager[Advance]]


@contextmanager
def no_progress(description: str, total: int | None) -> Iterator[Advance]:
    """Shows nothing."""
    yield lambda: None


def pass_summary(description: str, done: int, total: int | None, seconds: float, stopped: bool = False) -> str:
    """The line of a finished (or ``stopped``) pass: description, batches done (of ``total``), time and rate."""
    count = f"{done}/{total}" if total is not None else str(done)
    rate = f"{done / seconds:.1f} batches/s" if seconds > 0 else "-"
    return f"{description}: {count} batches in {seconds:.1f}s ({rate}){', stopped' if stopped else ''}"


@contextmanager
def _line(write: Callable[[str], None], description: str, total: int | None) -> Iterator[Advance]:
    """Counts the batches and writes ``pass_summary`` once, when the pass ends (or stops on an exception)."""
    done, start, stopped = 0, time.perf_counter(), False

    def advance() -> None:
        nonlocal done
        done += 1

    try:
        yield advance
    except BaseException:
        stopped = True
        raise
    finally:
        write(pass_summary(description, done, total, time.perf_counter() - start, stopped))


def _print_to(stream: TextIO) -> Callable[[str], None]:
    """Writes a line to ``stream`` past any tqdm bar drawn there (tqdm's ``write`` clears it and redraws it)."""
    from tqdm import tqdm

    def write(line: str) -> None:
        tqdm.write(line, file=stream)
        stream.flush()

    return write


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty())


@contextmanager
def _tqdm_bar(make: Callable[[], Any], description: str, total: int | None) -> Iterator[Advance]:
    """A tqdm bar from ``make()`` (e.g. Lightning's ``init_test_tqdm``), closed (and left shown) at the end."""
    bar = make()
    bar.set_description(description, refresh=False)
    bar.reset(total=total)
    try:
        yield lambda: bar.update(1)
    finally:
        bar.close()


@contextmanager
def _rich_task(progress: Any, description: str, total: int | None) -> Iterator[Advance]:
    """A task of the running rich ``progress`` (drawn by its own refresh thread); it stays shown when done, as a
    finished tqdm bar does."""
    task = progress.add_task(description, total=total)
    yield lambda: progress.update(task, advance=1)


@contextmanager
def _rich_display(columns: list[Any], console: Any, description: str, total: int | None) -> Iterator[Advance]:
    """A rich display of its own with ``columns`` on ``console``, holding one task."""
    from rich.progress import Progress  # installed wherever a RichProgressBar is

    with Progress(*columns, console=console) as progress, _rich_task(progress, description, total) as advance:
        yield advance


def _of_bar(trainer: Any) -> PassProgress:
    """The display of a pass for ``trainer``'s bar as it is now (module docstring; an object without a
    ``progress_bar_callback``, e.g. a stand-in trainer, has none)."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or not trainer.is_global_zero or not getattr(bar, "is_enabled", True):
        return no_progress
    if callable(getattr(bar, "init_test_tqdm", None)):  # TQDMProgressBar of either package: it draws on stdout
        if not _is_terminal(sys.stdout):
            return functools.partial(_line, _print_to(sys.stdout))
        return functools.partial(_tqdm_bar, bar.init_test_tqdm)
    if callable(getattr(bar, "configure_columns", None)) and hasattr(bar, "progress"):  # RichProgressBar
        running = bar.progress
        if running is not None:
            console = running.console
        else:  # the console the bar will open (its console_kwargs: stored privately, read with a default)
            from rich.console import Console

            console = Console(**(getattr(bar, "_console_kwargs", None) or {}))
        if not (console.is_terminal or console.is_jupyter):
            return functools.partial(
                _line, lambda line: console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
            )
        if running is not None and running.live.is_started:
            return functools.partial(_rich_task, running)
        return functools.partial(_rich_display, bar.configure_columns(trainer), console)
    return no_progress  # a bar of another kind: its own display is unknown


def trainer_progress(trainer: Any) -> PassProgress:
    """The passes' display following ``trainer``'s progress bar (module docstring)."""

    @contextmanager
    def progress(description: str, total: int | None) -> Iterator[Advance]:
        with _of_bar(trainer)(description, total) as advance:
            yield advance

    return progress


def terminal_progress() -> PassProgress:
    """The passes' display without a trainer: a tqdm bar on stderr, or the line where stderr is not a terminal."""
    if not _is_terminal(sys.stderr):
        return functools.partial(_line, _print_to(sys.stderr))
    from tqdm import tqdm

    return functools.partial(_tqdm_bar, lambda: tqdm(file=sys.stderr, leave=True, dynamic_ncols=True, unit="batch"))
