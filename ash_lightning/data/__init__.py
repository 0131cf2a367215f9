"""Data sources, the OOD evaluation data module and the pass of a network over ID fit data (``fit_pass``)."""

from ash_lightning.data.base import Source
from ash_lightning.data.datamodule import IndexedDataset, LoaderInfo, OODDataModule
from ash_lightning.data.sources import SOURCES, build_source

__all__ = ["IndexedDataset", "LoaderInfo", "OODDataModule", "SOURCES", "Source", "build_source"]
