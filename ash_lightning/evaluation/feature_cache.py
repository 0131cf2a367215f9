"""Feature cache: each test set's shared part of the forward pass (``ash_lightning.shaping.sweep.shared_part``: the
classifier's input for ``penultimate``, ``forward_features`` for ``pre_pool``), stored by one run and read by
later runs with the same key, which then run only the per-setting part and decode no images.

An entry is a folder ``<root>/<digest>/`` (``ash_lightning._cache.key_digest`` of the key) holding ``features.npy``
(N rows of the raw bytes of each sample's features, any torch dtype), ``targets.npy``, ``index.npy`` (the data module's
index: negative for a skipped corrupt file) and ``complete.json``: the key, dtype, sample shape and every file's
size and SHA-256. It is built in a hidden temporary folder beside it (``.<digest>.<random>.tmp``, its disk space
reserved when the first batch arrives, so a full disk fails then, not as a crash in a memory-mapped write) and
renamed into place complete: ``ash_lightning._cache``'s write rule, where the first writer wins. An entry is read
only when its marker is present and every file matches it; otherwise (a truncated or altered file, a partial entry
of an older version) a one-line warning names the problem and the entry is rebuilt. A write that fails (full disk,
read-only folder) gives one warning naming the folder and the run goes on uncached; a run that stops (an error,
SIGTERM, Ctrl+C) removes its temporary folder when its process exits.

The key (``set_key``) holds what the stored values depend on: the network identity (backbone name and weights
fingerprint, ``ash_lightning._cache.network_identity``),
the placement and split point, the parameter dtype, trainer precision and device type, the data set spec (paths
expanded, each existing file's or folder's size and modification time), the transform config, ``skip_corrupt``
and the number of samples; a change of any of them reads another entry. Only single-process runs use the cache.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import uuid
import warnings
import weakref
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ash_lightning._cache import (
    StaleEntry,
    canonical_json,
    key_digest,
    read_entry,
    warn_unwritable,
    writable_cache_folder,
)
from ash_lightning._files import expand_user_vars
from ash_lightning.data.datamodule import OODDataModuleMixin, SetIdentity
from ash_lightning.data.progress import Advance, PassProgress, no_progress, progress_in_test_loop
from ash_lightning.errors import UserError
from ash_lightning.shaping.sweep import split_point

log = logging.getLogger(__name__)

FORMAT = 1  # part of every key: bump it when what is stored changes
DEFAULT_MAX_GIB = 8.0
MARKER = "complete.json"
FILES = ("features.npy", "targets.npy", "index.npy")
GIB = 2**30
FIX = "free space there, or point model.feature_cache at a writable folder with space"


def set_key(network: Mapping[str, Any], data: SetIdentity) -> dict[str, Any]:
    """The key of one data set's entry: ``network`` (see ``network_key``) and the data's identity."""
    return {"format": FORMAT, **network, "data": dict(data.data), "num_samples": data.num_samples}


def network_key(
    network: Mapping[str, Any], model: nn.Module, placement: str, precision: str, device_type: str
) -> dict[str, Any]:
    """The network part of every set's key: ``network`` (``network_identity``: name, weights fingerprint), the
    placement, split point, dtype, precision and device type (features computed differently are stored apart)."""
    dtype = next(model.parameters(), torch.empty(0)).dtype
    return {
        **network,
        "placement": placement,
        "split_point": split_point(model, placement),
        "dtype": str(dtype),
        "precision": precision,
        "device": device_type,
    }


def entry_dir(root: str | os.PathLike[str], key: Mapping[str, Any]) -> Path:
    """The folder of ``key``'s entry under ``root``."""
    return Path(root) / key_digest(key)


def positions(index: Tensor) -> Tensor:
    """Sample positions from the data module's index (``-(i+1)`` marks a skipped corrupt file at position i)."""
    return torch.where(index >= 0, index, -index - 1)


def _file_record(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()  # hashlib.file_digest needs Python 3.11; this package supports 3.10
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


@dataclass(frozen=True)
class CachedSet:
    """A complete entry: ``features`` (N, bytes per sample) uint8, memory-mapped, of ``dtype`` and ``shape`` per
    sample; ``targets`` and ``index`` (N,)."""

    features: np.ndarray
    targets: np.ndarray
    index: np.ndarray
    dtype: torch.dtype
    shape: tuple[int, ...]

    def rows(self, at: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Features (B, *shape), targets and index of the samples at ``at`` (positions, or the data module's index)."""
        rows = positions(at).cpu().numpy()
        raw = torch.from_numpy(np.ascontiguousarray(self.features[rows]))
        features = raw.view(self.dtype).reshape(len(rows), *self.shape)
        return features, torch.from_numpy(self.targets[rows]), torch.from_numpy(self.index[rows])


def read_set(directory: Path, key: Mapping[str, Any]) -> CachedSet | None:
    """The complete entry in ``directory`` for ``key``; None if there is none, and None after a one-line warning
    when it is partial or corrupt (``read_entry``: the caller rebuilds it)."""
    return read_entry(directory, functools.partial(_read_set, key=key), "feature cache")


def _read_set(directory: Path, key: Mapping[str, Any]) -> CachedSet:
    """The entry in ``directory``: FileNotFoundError when there is none, StaleEntry when it is partial, holds
    another key or its files differ from its marker's record."""
    marker = directory / MARKER
    if not marker.is_file():
        if any((directory / name).exists() for name in FILES):
            raise StaleEntry("is partial (no completion marker: an interrupted run?)")
        raise FileNotFoundError(marker)
    meta = json.loads(marker.read_text())
    if meta["key"] != json.loads(canonical_json(key)):
        raise StaleEntry("holds another key")
    for name in FILES:
        path, expected = directory / name, meta["files"][name]
        if not path.is_file() or path.stat().st_size != expected["bytes"]:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
            raise StaleEntry(f"is corrupt ({name}: {found}, expected {expected['bytes']} bytes)")
        if _file_record(path)["sha256"] != expected["sha256"]:
            raise StaleEntry(f"is corrupt ({name}: checksum differs)")
    features, targets, index = (np.load(directory / name, mmap_mode="r") for name in FILES)
    dtype = getattr(torch, meta["dtype"].removeprefix("torch."))
    return CachedSet(features, targets, index, dtype=dtype, shape=tuple(meta["shape"]))


class EntryWriter:
    """Fills ``key``'s entry in ``directory`` batch by batch in a temporary folder beside it (rows go straight to
    a memory-mapped file whose disk space is reserved first) and commits it once every one of ``num_samples``
    positions has been written. The temporary folder is removed by ``discard``, or when the writer is dropped or
    the process exits without a commit."""

    def __init__(
        self, directory: Path, key: Mapping[str, Any], num_samples: int, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> None:
        self.directory, self.key, self.dtype, self.shape = directory, dict(key), dtype, shape
        self._tmp = directory.with_name(f".{directory.name}.{uuid.uuid4().hex}.tmp")
        self._tmp.mkdir(parents=True)
        self._remove_tmp = weakref.finalize(self, shutil.rmtree, self._tmp, ignore_errors=True)
        row_bytes = torch.empty((), dtype=dtype).element_size() * int(np.prod(shape, dtype=np.int64))
        features = self._tmp / FILES[0]
        self._rows: np.memmap | None = np.lib.format.open_memmap(
            features, mode="w+", dtype=np.uint8, shape=(num_samples, row_bytes)
        )
        reserve_space(features)
        self._targets = np.full(num_samples, -1, dtype=np.int64)
        self._index = np.zeros(num_samples, dtype=np.int64)
        self._seen = np.zeros(num_samples, dtype=bool)

    @property
    def complete(self) -> bool:
        return bool(self._seen.all())

    @property
    def written(self) -> int:
        return int(self._seen.sum())

    def add(self, features: Tensor, targets: Tensor, index: Tensor) -> None:
        """Store one batch: features (B, *shape) and the batch's targets and data module index."""
        at = positions(index).cpu().numpy()
        rows = features.detach().cpu().contiguous().reshape(len(at), -1).view(torch.uint8)
        assert self._rows is not None, "add() after commit() or discard()"
        self._rows[at] = rows.numpy()
        self._targets[at], self._index[at], self._seen[at] = targets.cpu().numpy(), index.cpu().numpy(), True

    def commit(self) -> bool:
        """Write targets, index and the marker, then rename the folder into place (``publish``); whether this
        writer's entry is the one in place (False: another run's complete entry was there first)."""
        assert self._rows is not None, "commit() after commit() or discard()"
        self._rows.flush()
        self._rows = None
        for name, array in zip(FILES[1:], (self._targets, self._index), strict=True):
            np.save(self._tmp / name, array)
        meta = {
            "format": FORMAT,
            "key": self.key,
            "dtype": str(self.dtype),
            "shape": list(self.shape),
            "files": {name: _file_record(self._tmp / name) for name in FILES},
        }
        (self._tmp / MARKER).write_text(canonical_json(meta))
        published = publish(self._tmp, self.directory, self.key)
        self._remove_tmp()  # only left when another run's entry won
        return published

    def discard(self) -> None:
        """Drop the unfinished entry's temporary folder."""
        self._rows = None
        self._remove_tmp()


def reserve_space(path: Path) -> None:
    """Allocate the disk blocks of the whole file ``path`` now (``posix_fallocate``): a disk that cannot hold it
    raises OSError (ENOSPC, EDQUOT) here instead of a SIGBUS in a later memory-mapped write. Nothing where the
    system or file system cannot preallocate."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


def publish(tmp: Path, directory: Path, key: Mapping[str, Any]) -> bool:
    """Rename the complete entry ``tmp`` to ``directory``, first writer wins: True when renamed; False when a valid
    entry of ``key`` was there already (``tmp`` stays for the caller to remove). A partial or corrupt entry in the
    way (an older version's, written in place) is moved aside under a temporary name and removed."""
    for _ in range(3):  # a concurrent writer may replace the same broken entry between the steps
        try:
            os.rename(tmp, directory)
            return True
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        try:
            _read_set(directory, key)
            return False
        except Exception:  # noqa: BLE001  (anything unreadable in the way is replaced)
            aside = directory.with_name(f".{directory.name}.{uuid.uuid4().hex}.tmp")
            try:
                os.rename(directory, aside)
            except FileNotFoundError:
                pass  # another writer moved it aside first
            else:
                shutil.rmtree(aside, ignore_errors=True)
    return False


@dataclass
class _Set:
    name: str
    key: dict[str, Any]
    num_samples: int
    cached: CachedSet | None
    writer: EntryWriter | None = None
    shown: ExitStack = field(default_factory=ExitStack)  # the build's progress display, open while it is written
    advance: Advance = field(default=lambda: None)  # counts one batch of the build


class FeatureCache:
    """One test run's use of the cache: per dataloader (``sets``: name, key, number of samples, in dataloader
    order) a complete entry to read, or an entry to write while the features are computed (unless ``writable`` is
    False, or a write failed: then the run stores nothing more). Features of a set larger than ``max_bytes`` are
    refused (UserError) at the first computed batch, before any is stored."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        sets: list[tuple[str, dict[str, Any], int]],
        max_bytes: float,
        model: nn.Module,
        placement: str,
        writable: bool = True,
        progress: PassProgress = no_progress,
    ) -> None:
        self.root, self.max_bytes, self._size_checked = Path(root), max_bytes, False
        self.model, self.placement, self.writable, self.progress = model, placement, writable, progress
        self.sets = [_Set(name, key, n, read_set(entry_dir(root, key), key)) for name, key, n in sets]

    @property
    def complete_sets(self) -> frozenset[str]:
        """Names of the sets read from the cache: their batches need no images."""
        return frozenset(s.name for s in self.sets if s.cached is not None)

    def shared(
        self, loader: int, targets: Tensor, index: Tensor, compute: Callable[[], Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(shared, targets, index)`` of a batch of dataloader ``loader``: read from its entry (``index`` holds
        positions), else ``compute()``d and stored."""
        entry = self.sets[loader]
        if entry.cached is not None:
            features, targets_, index_ = entry.cached.rows(index)
            return features.to(index.device), targets_.to(index.device), index_.to(index.device)
        shared = compute()
        if self.writable:
            self._store(entry, shared, targets, index)
        return shared, targets, index

    def _store(self, entry: _Set, shared: Tensor, targets: Tensor, index: Tensor) -> None:
        """Add the batch to its set's entry (committed when whole); after a failed write, one warning
        (``warn_unwritable``), every unfinished entry dropped and nothing more stored in this run."""
        try:
            if entry.writer is None:
                self._check_size(shared)
                directory = entry_dir(self.root, entry.key)
                entry.writer = EntryWriter(directory, entry.key, entry.num_samples, shared.dtype, shared.shape[1:])
                description = f"test {entry.name} and cache its features ({entry.num_samples} samples)"
                entry.advance = entry.shown.enter_context(self.progress(description, None))
            entry.writer.add(shared, targets, index)
            entry.advance()
            if entry.writer.complete:
                stored = entry.writer.commit()
                entry.writer = None
                entry.shown.close()
                log.info(
                    "feature cache: %s data set %r in %s",
                    "stored" if stored else "another run stored",
                    entry.name,
                    entry_dir(self.root, entry.key),
                )
        except OSError as err:
            self.writable = False
            self._drop_writers()
            warn_unwritable(self.root, err, FIX)

    def _drop_writers(self) -> list[tuple[_Set, int]]:
        """Discard every unfinished entry; the sets and how many samples each had written."""
        dropped = []
        for entry in self.sets:
            if entry.writer is not None:
                dropped.append((entry, entry.writer.written))
                entry.writer.discard()
                entry.writer = None
                entry.shown.close()
        return dropped

    def _check_size(self, shared: Tensor) -> None:
        """UserError when the largest set still to be stored would exceed ``max_bytes`` (from this batch's size)."""
        if self._size_checked:
            return
        self._size_checked = True
        check_placement(self.model, self.placement)  # the first pass may find the classifier is not last
        per_sample = shared[:1].numel() * shared.element_size()
        largest = max((s for s in self.sets if s.cached is None), key=lambda s: s.num_samples)
        need = per_sample * largest.num_samples
        if need > self.max_bytes:
            raise UserError(
                f"model.feature_cache: the features at this placement take {per_sample / 2**10:.1f} KiB per sample "
                f"(shape {tuple(shared.shape[1:])}), {need / GIB:.2f} GiB for data set {largest.name!r} "
                f"({largest.num_samples} samples), over the limit model.feature_cache_max_gib = "
                f"{self.max_bytes / GIB:g} GiB. Fix: raise model.feature_cache_max_gib, use placement: penultimate, "
                "or remove model.feature_cache."
            )

    def close(self) -> None:
        """Drop the entries of sets that were not evaluated whole (e.g. ``limit_test_batches``), with a warning."""
        for entry, written in self._drop_writers():
            warnings.warn(
                f"feature cache: data set {entry.name!r} not stored: {written} of its {entry.num_samples} "
                "samples were evaluated (limit_test_batches?); only whole sets are cached.",
                stacklevel=2,
            )


def check_placement(model: nn.Module, placement: str) -> None:
    """UserError when ``placement``'s shared part is the input itself (nothing to cache): a placement inside
    the network, or a classifier whose output is not the network's (known after the first batch)."""
    if split_point(model, placement) != "network":
        return
    reason = (
        f"{type(model).__name__}'s output is not its classifier's output"
        if placement == "penultimate"
        else f"placement {placement!r} shapes inside the network"
    )
    raise UserError(
        f"model.feature_cache: {reason}, so every shaping setting reruns the whole network from the images and "
        "there are no shared features to cache. Fix: use placement: penultimate or pre_pool, or remove "
        "model.feature_cache."
    )


def open_feature_cache(
    root: str, network: Mapping[str, Any], model: nn.Module, placement: str, trainer: Any, max_gib: float
) -> FeatureCache | None:
    """The cache for ``trainer``'s test run of ``model`` (``network``: its ``network_identity``) over an
    ``OODDataModule`` (``test_set_identities``); None, with a warning, for a multi-process run (each rank sees one
    shard) or another data module (its sets' identity is unknown). A UserError when ``root`` is a file; a folder
    that cannot be created or written gives one warning and is only read."""
    directory = Path(expand_user_vars(root))
    if directory.is_file():
        raise UserError(
            f"model.feature_cache: output folder {str(directory)!r} is a file, not a folder. Fix: point it at a "
            "folder you can write to."
        )
    datamodule = trainer.datamodule
    if trainer.world_size > 1:
        reason = f"this run has {trainer.world_size} processes, and only single-process runs use it"
    elif not isinstance(datamodule, OODDataModuleMixin):
        reason = "the test data does not come from an OODDataModule, so its identity is unknown"
    else:
        reason = None
    if reason:
        if trainer.is_global_zero:
            warnings.warn(f"model.feature_cache is not used: {reason}; features are computed.", stacklevel=2)
        return None
    net = network_key(network, model, placement, str(trainer.precision), trainer.strategy.root_device.type)
    sets = [(data.name, set_key(net, data), data.num_samples) for data in datamodule.test_set_identities()]
    writable = writable_cache_folder(directory, directory, FIX)
    return FeatureCache(directory, sets, max_gib * GIB, model, placement, writable, progress_in_test_loop(trainer))
