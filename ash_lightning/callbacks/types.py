"""The types the callbacks' hooks receive: either Lightning package's Trainer and LightningModule.

``Trainer`` is a Protocol of the attributes the callbacks read, which both packages' Trainers share. Both packages
ship the same LightningModule under two names (``ash_lightning.lightning_packages``), so for type checks the
``pytorch_lightning`` class stands for both. At run time nothing is imported from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pytorch_lightning import LightningModule as LightningModule


class Trainer(Protocol):
    """What the callbacks read from a Trainer of either Lightning package."""

    datamodule: Any
    callbacks: list[Any]
    loggers: list[Any]
    log_dir: str | None
    default_root_dir: str
    world_size: int
    global_rank: int
    is_global_zero: bool
    precision: Any
    strategy: Any
    precision_plugin: Any
    progress_bar_callback: Any
    num_test_batches: list[int | float]
    test_dataloaders: Any
    global_step: int
    lightning_module: Any
