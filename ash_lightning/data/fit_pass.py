"""One pass of a network over ID fit data: the pass that calibrated shapers (``ash_lightning.shaping.calibration``)
and fitted detectors (``ash_lightning.detectors.fitting``) collect their statistics in.

``FitPass`` holds what such a pass needs besides the network: where the batches come from, the cache key that
identifies network and data (None: nothing is cached), at most how many samples, and on which device.
``FitPass.run(model, take, ...)`` puts the model in eval mode (restoring its mode after), reads each batch's
images (``fit_images``: corrupt files the data module skipped are dropped) and labels, cuts the pass at
``max_samples`` and hands each non-empty ``FitBatch`` to ``take``, showing the pass's ``progress``
(``ash_lightning.data.progress``: ``fit <what> on <data_name>``, in batches). After each batch it calls ``stop``,
which ends the pass by raising: ``stop_on_signal(trainer)`` raises for a SIGTERM or Ctrl+C the trainer's run
received, so a long pass before the test loop stops after the batch in flight, as the test loop does, and nothing
it collected reaches a cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ash_lightning.data.batches import batch_part, fit_images
from ash_lightning.data.progress import PassProgress, no_progress
from ash_lightning.errors import UserError
from ash_lightning.lightning_packages import main_package_class

__all__ = [
    "FitBatch",
    "FitData",
    "FitPass",
    "fit_batches",
    "fit_loader_of",
    "no_stop",
    "planned_batches",
    "stop_on_signal",
]

FitData = Iterable[Any] | Callable[[], Iterable[Any]]


def fit_batches(data: FitData) -> Iterable[Any]:
    """``data`` itself when it is a DataLoader (or any iterable of batches), else ``data()``."""
    return data if isinstance(data, Iterable) else data()


def planned_batches(loader: Iterable[Any], max_samples: int | None) -> int | None:
    """The batches a pass over ``loader`` reads: ``len(loader)`` (None when unknown), at most as many as
    ``max_samples`` fill at its ``batch_size`` (a pass that drops corrupt files reads more)."""
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
    size = getattr(loader, "batch_size", None)
    return min(total, math.ceil(max_samples / size)) if max_samples is not None and size else total


def fit_loader_of(trainer: Any) -> DataLoader | None:
    """The ID fit dataloader of ``trainer``'s data module (``OODDataModule.fit_dataloader``), or None."""
    fit_dataloader = getattr(getattr(trainer, "datamodule", None), "fit_dataloader", None)
    return fit_dataloader() if callable(fit_dataloader) else None


def no_stop() -> None:
    """Never stops a pass."""


def stop_on_signal(trainer: Any) -> Callable[[], None]:
    """A ``FitPass.stop`` for a pass inside ``trainer``'s run: raises Lightning's ``SIGTERMException`` once the
    trainer received SIGTERM (``main.py`` exits 143), KeyboardInterrupt once one of its callbacks holds a Ctrl+C
    (``stop_requested``: ``ash_lightning.callbacks.interrupt``; exit 130)."""

    def stop() -> None:
        if getattr(trainer, "received_sigterm", False):
            raise main_package_class("utilities.exceptions", "SIGTERMException")
        if any(getattr(callback, "stop_requested", False) for callback in getattr(trainer, "callbacks", ())):
            raise KeyboardInterrupt

    return stop


@dataclass(frozen=True)
class FitBatch:
    """The samples a fit pass takes from one batch: ``images`` (corrupt files dropped, cut at ``max_samples``,
    on the pass's device), their ``labels`` (None when the batch holds no labels, one per image) and ``batch``
    as the loader gave it (for messages)."""

    images: Tensor
    labels: Tensor | None
    batch: Any


@dataclass(frozen=True)
class FitPass:
    """What a pass over ID fit data needs besides the network.

    Attributes:
        data: called (only when a pass runs) for the batches; None from it means no fit data was configured.
        cache_key: the identity of the network and the fit data for the caches, None for data of unknown
            identity (nothing is then read from or written to a cache).
        max_samples: take the first this many samples (None: all).
        device: where the images go (None: the model's device).
        data_name: what the progress calls the fit data (e.g. ``data.fit``).
        progress: how a pass is shown (``ash_lightning.data.progress``; default: not at all).
        stop: called after each batch; ends the pass by raising (``stop_on_signal``; default: never).
    """

    data: Callable[[], Iterable[Any] | None]
    cache_key: dict[str, Any] | None = None
    max_samples: int | None = None
    device: torch.device | None = None
    data_name: str = "the fit data"
    progress: PassProgress = no_progress
    stop: Callable[[], None] = no_stop

    def __post_init__(self) -> None:
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(
                f"max_samples must be a positive number of fit samples or None (all), got {self.max_samples}."
            )

    def device_of(self, model: nn.Module) -> torch.device:
        """``device``, else the device of ``model``'s parameters (the CPU without any)."""
        return self.device or next(model.parameters(), torch.empty(0)).device

    def run(
        self,
        model: nn.Module,
        take: Callable[[FitBatch], None],
        *,
        what: str,
        no_data: str,
        grad_mode: Callable[[], AbstractContextManager[Any]] = torch.inference_mode,
    ) -> int:
        """Hand every non-empty batch of the first ``max_samples`` samples to ``take``, with ``model`` in eval
        mode and under ``grad_mode()`` (default ``torch.inference_mode``); the number of samples taken. ``what``
        names the methods fitted (e.g. "knn@50, mds") in the progress and in a UserError when the data yields no
        samples; a UserError ``no_data`` when ``data()`` is None."""
        loader = self.data()
        if loader is None:
            raise UserError(no_data)
        device, seen, was_training = self.device_of(model), 0, model.training
        progress = self.progress(f"fit {what} on {self.data_name}", planned_batches(loader, self.max_samples))
        try:
            model.eval()
            with grad_mode(), progress as advance:
                for batch in loader:
                    images, keep = fit_images(batch)
                    labels = batch_part(batch, "labels")
                    labels = labels if labels is not None and labels.shape == images.shape[:1] else None
                    if keep is not None:
                        images, labels = images[keep], None if labels is None else labels[keep]
                    cut = None if self.max_samples is None else self.max_samples - seen
                    images, labels = images[:cut], None if labels is None else labels[:cut]
                    if len(images):
                        take(FitBatch(images.to(device), labels, batch))
                    seen += len(images)
                    advance()
                    self.stop()
                    if seen == self.max_samples:
                        break
        finally:
            model.train(was_training)
        if not seen:
            raise UserError(
                f"the ID fit data (data.fit, or the fit_dataloader given) has no samples, so {what} cannot be "
                "fitted. Fix: give a non-empty ID data set."
            )
        return seen
