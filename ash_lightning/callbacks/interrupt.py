"""``StopAfterBatchOnCtrlC``: Ctrl+C ends a test run after the batch in flight, the way Lightning handles SIGTERM.

Python raises KeyboardInterrupt wherever the main process happens to be; inside PyTorch's DataLoader (a worker
iterator being built or torn down) it is swallowed by ``__del__`` with a traceback on stderr, and the run goes on
to exit 0. Deferring it to the end of the current batch stops the run the same way every time: Lightning calls
``on_exception`` (the finished sets are saved) and ``main.py`` exits 130. A second Ctrl+C stops at once. A fit pass
before the test loop (calibration, detectors) reads ``stop_requested`` after each of its batches
(``ash_lightning.data.fit_pass.stop_on_signal``) and stops there too.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

from ash_lightning.lightning_packages import CALLBACK_BASES


class StopAfterBatchOnCtrlC(*CALLBACK_BASES):  # type: ignore[misc]  # the Callback of every installed package
    """While a test runs, the first SIGINT is held until the current batch ends and then raised as
    KeyboardInterrupt; a second one raises at once; DataLoader workers ignore it (the main process stops them).
    The previous SIGINT handler is restored when the run ends or fails."""

    def __init__(self) -> None:
        self._requested = False
        self._previous: Any = None
        self._pid = os.getpid()

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker (forked with this handler): the main process decides
            return
        if self._requested:
            raise KeyboardInterrupt
        self._requested = True
        print("\nCtrl+C: stopping after the current batch (press it again to stop at once) ...", flush=True)

    @property
    def stop_requested(self) -> bool:
        """Whether a Ctrl+C is held until the batch in flight (of the test loop or of a fit pass) ends."""
        return self._requested

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._requested, self._pid = False, os.getpid()
        if self._previous is None:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def on_test_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._requested:
            raise KeyboardInterrupt

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._restore()  # Lightning skips ``teardown`` when the run fails

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
