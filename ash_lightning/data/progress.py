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
* ``progress_in_test_loop(trainer)``: a pass that runs inside the trainer's test loop (a feature-cache build), whose
  batches the trainer's own test bar already counts: that bar is renamed to the pass's description (Lightning's reads
  ``Testing DataLoader <k>``), so one bar shows what runs, the count and the rate.

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

__all__ = [
    "Advance",
    "PassProgress",
    "no_progress",
    "pass_summary",
    "terminal_progress",
    "progress_in_test_loop",
    "trainer_progress",
]

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


def _shown_bar(trainer: Any) -> Any | None:
    """``trainer``'s progress bar callback where it shows (module docstring), else None (also for an object without
    a ``progress_bar_callback``, e.g. a stand-in trainer)."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or not trainer.is_global_zero or not getattr(bar, "is_enabled", True):
        return None
    return bar


def _is_tqdm(bar: Any) -> bool:
    return callable(getattr(bar, "init_test_tqdm", None))  # TQDMProgressBar of either package: it draws on stdout


def _is_rich(bar: Any) -> bool:
    return callable(getattr(bar, "configure_columns", None)) and hasattr(bar, "progress")  # RichProgressBar


def _rich_console(bar: Any) -> Any:
    """The console of a RichProgressBar's running display, else the one it will open (its console_kwargs: stored
    privately, read with a default)."""
    if bar.progress is not None:
        return bar.progress.console
    from rich.console import Console  # installed wherever a RichProgressBar is

    return Console(**(getattr(bar, "_console_kwargs", None) or {}))


def _log_line(bar: Any) -> Callable[[str], None] | None:
    """Where ``bar`` draws on a stream that is not a terminal (a log file, a pipe): how a pass writes its line there;
    None on a terminal, or for a bar of another kind (its own display is unknown)."""
    if _is_tqdm(bar):
        return None if _is_terminal(sys.stdout) else _print_to(sys.stdout)
    if _is_rich(bar):
        console = _rich_console(bar)
        if console.is_terminal or console.is_jupyter:
            return None
        return lambda line: console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
    return None


def _own_bar(bar: Any, trainer: Any) -> PassProgress:
    """A bar of the pass's own on a terminal: one made like Lightning's tqdm test bar, or a task of the rich bar's
    display (its running one, else one of its own)."""
    if _is_tqdm(bar):
        return functools.partial(_tqdm_bar, bar.init_test_tqdm)
    if _is_rich(bar):
        if bar.progress is not None and bar.progress.live.is_started:
            return functools.partial(_rich_task, bar.progress)
        return functools.partial(_rich_display, bar.configure_columns(trainer), _rich_console(bar))
    return no_progress


@contextmanager
def _renamed_test_bar(rename: Callable[[str], None], description: str, total: int | None) -> Iterator[Advance]:
    """The trainer's running test bar, which counts the batches itself, shows ``description`` (``rename``)."""
    rename(description)
    yield lambda: None


def _test_bar_renamed(bar: Any, trainer: Any) -> PassProgress:
    """On a terminal, the running test bar of Lightning's ``TQDMProgressBar`` or ``RichProgressBar`` renamed;
    nothing before the test bar exists."""
    if _is_tqdm(bar) and bar._test_progress_bar is not None:  # its public property raises while unset
        return functools.partial(_renamed_test_bar, bar._test_progress_bar.set_description)
    if _is_rich(bar) and bar.progress is not None and bar.test_progress_bar_id is not None:
        task, progress = bar.test_progress_bar_id, bar.progress
        return functools.partial(_renamed_test_bar, lambda text: progress.update(task, description=text))
    return no_progress


@contextmanager
def _shown_as_it_starts(
    on_terminal: Callable[[Any, Any], PassProgress], trainer: Any, description: str, total: int | None
) -> Iterator[Advance]:
    """The pass's display for ``trainer``'s bar as it is when the pass starts (it may change between passes):
    nothing without a bar, the pass's line on a log stream, else ``on_terminal(bar, trainer)``."""
    bar = _shown_bar(trainer)
    write = None if bar is None else _log_line(bar)
    shown: PassProgress
    if bar is None:
        shown = no_progress
    elif write is not None:
        shown = functools.partial(_line, write)
    else:
        shown = on_terminal(bar, trainer)
    with shown(description, total) as advance:
        yield advance


def trainer_progress(trainer: Any) -> PassProgress:
    """The passes' display following ``trainer``'s progress bar (module docstring)."""
    return functools.partial(_shown_as_it_starts, _own_bar, trainer)


def progress_in_test_loop(trainer: Any) -> PassProgress:
    """The display of passes inside ``trainer``'s test loop (module docstring)."""
    return functools.partial(_shown_as_it_starts, _test_bar_renamed, trainer)


def terminal_progress() -> PassProgress:
    """The passes' display without a trainer: a tqdm bar on stderr, or the line where stderr is not a terminal."""
    if not _is_terminal(sys.stderr):
        return functools.partial(_line, _print_to(sys.stderr))
    from tqdm import tqdm

    return functools.partial(_tqdm_bar, lambda: tqdm(file=sys.stderr, leave=True, dynamic_ncols=True, unit="batch"))
