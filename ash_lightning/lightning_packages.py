"""Either Lightning package: ``pytorch_lightning`` or ``lightning.pytorch`` (from ``pip install lightning``).

The two packages ship the same code under two names, and each Trainer and LightningCLI checks classes with
``isinstance``/``issubclass`` against its own package. ash-lightning meets both this way:

* Callbacks subclass the ``Callback`` of every installed package (``CALLBACK_BASES``), so either Trainer and
  either LightningCLI accepts them. They touch the trainer only through attributes both packages share.
* The LightningModule and the data module cannot: lightning's Trainer rejects a module that subclasses both
  packages' ``LightningModule`` ("Both configure_model and configure_sharded_model are overridden"). Their code
  is written once, as a mixin without a Lightning base (``OODEvalModuleMixin``, ``OODDataModuleMixin``), and each
  package gets its class from it: ``ash_lightning.module.OODEvalModule`` and
  ``ash_lightning.data.OODDataModule`` for ``pytorch_lightning``, ``ash_lightning.lightning.OODEvalModule`` and
  ``ash_lightning.lightning.OODDataModule`` for ``lightning.pytorch``.
* Loggers are recognised by what they hold, not by their class: a TensorBoard logger is one whose
  ``experiment`` writes histograms and figures (a ``SummaryWriter``), whichever package made it.
* ``main.py`` is a LightningCLI of ``MAIN_PACKAGE`` (that of ``ash_lightning.module.OODEvalModule``): the CLI
  takes its classes from ``main_package_class``.

This is the one module that names the packages, apart from the entry modules of each (``module.py``,
``data/datamodule.py``, ``lightning.py``) and the demo.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

PACKAGES = ("pytorch_lightning", "lightning.pytorch")
#: The package of ``ash_lightning.module.OODEvalModule`` and ``ash_lightning.data.OODDataModule``, and of
#: ``main.py``'s LightningCLI.
MAIN_PACKAGE = PACKAGES[0]
#: The loggers that both packages (and their Fabric) log informational lines to (``rank_zero_info``, the seed line).
INFO_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning_fabric.utilities.seed",
    "lightning.fabric.utilities.seed",
)


def installed_packages() -> tuple[Any, ...]:
    """The Lightning packages importable here, in ``PACKAGES`` order."""
    found = []
    for name in PACKAGES:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    if not found:
        raise ImportError("ash-lightning needs a Lightning package. Fix: pip install pytorch-lightning (or lightning).")
    return tuple(found)


def main_package_class(module: str, name: str) -> Any:
    """``name`` from ``MAIN_PACKAGE``'s submodule ``module``, e.g. ``main_package_class("cli", "LightningCLI")``;
    imported on first use."""
    return getattr(importlib.import_module(f"{MAIN_PACKAGE}.{module}"), name)


if TYPE_CHECKING:
    #: The ``Callback`` class of every installed package.
    CALLBACK_BASES: tuple[type, ...]
    #: Lightning's ``rank_zero_info`` (to Lightning's logger, on global rank 0 only) and ``rank_zero_warn`` (a
    #: Python warning, on global rank 0 only), of the first installed package (both share one implementation).
    rank_zero_info: Callable[..., None]
    rank_zero_warn: Callable[..., None]


def __getattr__(name: str) -> Any:
    """``CALLBACK_BASES``, ``rank_zero_info`` and ``rank_zero_warn``, made on first use (PEP 562): importing this
    module imports no Lightning package, so commands that need none (``main.py list``, ``report``) start faster."""
    if name == "CALLBACK_BASES":
        return tuple(package.Callback for package in installed_packages())
    if name in ("rank_zero_info", "rank_zero_warn"):
        rank_zero = importlib.import_module(f"{installed_packages()[0].__name__}.utilities.rank_zero")
        return getattr(rank_zero, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tensorboard_writer(loggers: Iterable[Any]) -> Any | None:
    """The ``SummaryWriter`` of the first logger that has one (a TensorBoardLogger of either package), or None."""
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if callable(getattr(experiment, "add_histogram", None)) and callable(getattr(experiment, "add_figure", None)):
            return experiment
    return None
