"""Data sources and the OOD evaluation data module."""

from ash_lightning.data.base import Source
from ash_lightning.data.datamodule import IndexedDataset, LoaderInfo, OODDataModule
from ash_lightning.data.sources import SOURCES, build_source

__all__ = ["IndexedDataset", "LoaderInfo", "OODDataModule", "SOURCES", "Source", "build_source"]
