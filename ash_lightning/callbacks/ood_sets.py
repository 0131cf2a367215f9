"""The sets given to ``OODMetricsCallback(ood=..., csid=...)``: each becomes a DataLoader over this rank's shard.

A set is a ``torch.utils.data.Dataset``, a ``DataLoader``, or a data spec as in ``data.ood`` (``"npz:path"``,
``{kind: folder, path: ...}``, ``imglist``, the torchvision kinds). A Dataset or spec gets the ID test loader's
batch size and workers unless the callback names its own; a DataLoader keeps its batch size, workers and
``collate_fn``. A spec's images (RGB) go through ``transform`` in the ID data's mode: a one-channel ID batch
gives one-channel (``L``) images. Rank r of w scores the samples r, r+w, r+2w, ... (each once, no padding), and
each sample's index is its position in the set, so gathering the ranks counts every sample once (a rank past
the end of a set smaller than the world scores one repeated sample, counted once). An
``IterableDataset`` cannot be sharded: every rank scores all of it and the gather keeps each index once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset, Subset

from ash_lightning.data.base import Source
from ash_lightning.data.datamodule import IndexedDataset
from ash_lightning.data.sources import build_source
from ash_lightning.errors import UserError

if TYPE_CHECKING:
    from ash_lightning.callbacks.types import Trainer

OODSet = Dataset | DataLoader | str | Mapping[str, Any]


def is_spec(value: Any) -> bool:
    """Whether ``value`` is a data spec (a string or a mapping such as ``{kind: npz, path: ...}``)."""
    return isinstance(value, str) or (isinstance(value, Mapping) and not isinstance(value, Dataset))


def plain(value: Any) -> Any:
    """``value`` with every mapping a dict and every list-like a list (Hydra's DictConfig/ListConfig included)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return value


def described(value: Any) -> Any:
    """A text form of an OOD set for the files that record it: a spec as written, else its class and size."""
    if is_spec(value):
        return plain(value)
    if isinstance(value, DataLoader):
        return f"DataLoader({described(value.dataset)}, batch_size={value.batch_size})"
    size = f", {len(value)} samples" if hasattr(value, "__len__") else ""
    return f"{type(value).__module__}.{type(value).__qualname__}{size}"


def id_test_loader(trainer: Trainer) -> DataLoader | None:
    """The trainer's (first) test dataloader, or None."""
    loaders = trainer.test_dataloaders
    first = loaders[0] if isinstance(loaders, Sequence) and loaders else loaders
    return first if isinstance(first, DataLoader) else None


def dataset_transform(dataset: Any) -> Any:
    """The ``transform`` attribute of ``dataset``, looked up through ``Subset`` and ``ConcatDataset``; None."""
    while True:
        if isinstance(dataset, Subset):
            dataset = dataset.dataset
        elif isinstance(dataset, ConcatDataset):
            dataset = dataset.datasets[0]
        else:
            return getattr(dataset, "transform", None)


class InMode:
    """``transform(image.convert(mode))``: a spec's RGB images in the mode the ID data has (picklable)."""

    def __init__(self, transform: Callable[[Any], Any], mode: str) -> None:
        self.transform, self.mode = transform, mode

    def __call__(self, image: Any) -> Any:
        return self.transform(image.convert(self.mode) if image.mode != self.mode else image)


@dataclass(frozen=True)
class OODSource:
    """An OOD set as given (``value``) and, for a data spec, its images (``source``) and their ``transform``."""

    name: str
    value: Any
    source: Source | None = None
    transform: Any = None


def prepare(name: str, value: Any, transform: Any, id_loader: DataLoader | None, role: str = "ood") -> OODSource:
    """Check a set of ``OODMetricsCallback(<role>=...)`` (``ood`` or ``csid``) and, for a spec, read its file list
    and pick its transform: ``transform``, else the ID test data set's own; UserErrors naming the fix for a value of
    another type, for a spec without either, and for a spec with ``resize`` (the data module's key: the callback's
    transform is the user's). Called when testing starts, so that these fail before the ID set runs."""
    if not (is_spec(value) or isinstance(value, (Dataset, DataLoader))):
        raise UserError(
            f"OODMetricsCallback({role}={{{name!r}: {type(value).__name__}}}): a set is a Dataset, a DataLoader "
            "or a data spec (e.g. 'npz:$DATASETS/mnist_test.npz' or {kind: folder, path: ...}). Fix: give one of "
            "these."
        )
    if not is_spec(value):
        return OODSource(name, value)
    if isinstance(value, Mapping) and "resize" in value:
        raise UserError(
            f"OODMetricsCallback({role}={{{name!r}: ...}}): `resize` is read by OODDataModule only; the callback's "
            "specs go through its transform=. Fix: drop `resize` and give this set as a Dataset with its own "
            "transform."
        )
    transform = transform if transform is not None else dataset_transform(getattr(id_loader, "dataset", None))
    if transform is None:
        raise UserError(
            f"OODMetricsCallback({role}={{{name!r}: {described(value)!r}}}): a data spec is read as images and needs "
            "a transform, and the ID test data set has no `transform` attribute to reuse. Fix: pass "
            "OODMetricsCallback(transform=<the ID test transform, e.g. torchvision.transforms.ToTensor()>)."
        )
    return OODSource(name, value, build_source(plain(value), f"ood_metrics.{role}.{name}"), transform)


def shard_loader(
    ood: OODSource,
    id_loader: DataLoader | None,
    batch_size: int | None,
    num_workers: int | None,
    channels: int | None,
    rank: int,
    world_size: int,
) -> tuple[DataLoader, list[int] | None]:
    """This rank's loader of an OOD set and the set positions it yields in order (None: an IterableDataset,
    whose positions are counted as it is read). A spec's images are given in the ID data's mode (``L`` for
    one channel)."""
    value = ood.value
    if ood.source is not None:
        dataset: Any = IndexedDataset(ood.source, InMode(ood.transform, "L" if channels == 1 else "RGB"), "raise", ())
    else:
        dataset = value.dataset if isinstance(value, DataLoader) else value
    template = value if isinstance(value, DataLoader) else id_loader
    size = (
        batch_size
        or (value.batch_size if isinstance(value, DataLoader) else None)
        or (id_loader.batch_size if id_loader is not None else None)
        or 1
    )
    workers = num_workers if num_workers is not None else (template.num_workers if template is not None else 0)
    collate = value.collate_fn if isinstance(value, DataLoader) else None
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=size, num_workers=workers, collate_fn=collate), None
    if len(dataset) == 0:
        raise UserError(f"OODMetricsCallback: OOD set {ood.name!r} is empty. Fix: give it samples, or leave it out.")
    # a set smaller than the world gives the ranks past its end a repeat of one sample (gathering counts it once):
    # every rank then has rows to gather
    positions = list(range(rank, len(dataset), world_size)) or [rank % len(dataset)]
    loader = DataLoader(dataset, batch_size=size, sampler=positions, num_workers=workers, collate_fn=collate)
    return loader, positions
