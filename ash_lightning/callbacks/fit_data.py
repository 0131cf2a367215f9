"""The ID fit data of a callback: its ``fit_dataloader``, else the data module's, with the checks both callbacks
make before a backbone pass."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ash_lightning.data.batches import batch_part
from ash_lightning.data.fit_pass import FitData, fit_batches, fit_loader_of
from ash_lightning.errors import UserError

if TYPE_CHECKING:
    from ash_lightning.callbacks.types import Trainer


def id_fit_data(fit_dataloader: FitData | None, trainer: Trainer, needs: str, fix: str) -> Iterable[Any]:
    """``fit_dataloader``'s batches, else the data module's ``fit_dataloader()``; else a UserError: ``needs`` says
    what needs ID data, ``fix`` how to give it."""
    if fit_dataloader is not None:
        return fit_batches(fit_dataloader)
    loader = fit_loader_of(trainer)
    if loader is None:
        raise UserError(f"{needs} needs ID statistics, and the trainer has no ID fit data for it. Fix: {fix}")
    return loader


def fit_data_name(fit_dataloader: FitData | None, trainer: Trainer) -> str:
    """What the fit passes' progress calls the data ``id_fit_data`` reads: ``fit_dataloader``, else the data
    module's ``data.fit`` (an ``OODDataModule``'s) or ``fit_dataloader()``."""
    if fit_dataloader is not None:
        return "fit_dataloader"
    return "data.fit" if "fit" in getattr(trainer.datamodule, "hparams", {}) else "the data module's fit_dataloader()"


def require_fit_labels(loader: Iterable[Any], needs: str) -> None:
    """A UserError unless the first batch of ``loader`` carries class labels (none negative)."""
    first = next(iter(loader), None)
    labels = None if first is None else batch_part(first, "labels")
    if labels is None or (len(labels) and int(labels.min()) < 0):
        raise UserError(
            f"{needs} needs the class labels of the ID fit data, but its first batch carries none (or unlabelled "
            "ones, -1). Fix: give labelled ID data, e.g. the training loader yielding (x, y), as fit_dataloader; "
            "or use knn, vim, fdbd or nnguide."
        )
