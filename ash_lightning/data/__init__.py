"""Data sources, the OOD evaluation data module and the pass of a network over ID fit data (``fit_pass``).

The data module's names are imported on first use (PEP 562), so code that needs only the sources or the fit pass
(``main.py list``, ``report``, the functional API) does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ash_lightning.data.base import Source
from ash_lightning.data.sources import SOURCES, build_source

if TYPE_CHECKING:
    from ash_lightning.data.datamodule import IndexedDataset, LoaderInfo, OODDataModule

__all__ = ["IndexedDataset", "LoaderInfo", "OODDataModule", "SOURCES", "Source", "build_source"]

_DATAMODULE_NAMES = ("IndexedDataset", "LoaderInfo", "OODDataModule")


def __getattr__(name: str) -> Any:
    if name in _DATAMODULE_NAMES:
        return getattr(importlib.import_module("ash_lightning.data.datamodule"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
