"""Data set sources for OOD evaluation, behind one registry: ``build_source(spec)`` -> a ``Source``.

A spec is a dict with ``kind`` and kind-specific keys, or the shorthand string ``"kind:path"``
(``"npz:$DATASETS/mnist_test.npz"``, ``"folder:/data/inat"``, ``"gaussian"``). Paths expand ``~`` and
environment variables. Every source yields ``(PIL RGB image, int target)``; unlabelled images get -1.
``data_identity(spec)`` is what a source's samples depend on, for cache keys.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence, Sized
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd

from ash_lightning._files import expand_set_vars, expand_user_vars, npz_problem
from ash_lightning._options import check_int
from ash_lightning.data.base import FileSource, Source, expand_path
from ash_lightning.data.images import to_rgb8
from ash_lightning.data.imglist import imglist_source
from ash_lightning.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class ArraySource(Dataset):
    """Images from a uint8 array (N,H,W,C) or (N,H,W) with int targets."""

    def __init__(self, images: np.ndarray, targets: np.ndarray) -> None:
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return to_rgb8(Image.fromarray(self.images[i])), int(self.targets[i])


class NoiseSource(Dataset):
    """Synthetic images, reproducible per index: ``gaussian`` N(0.5, 0.25) or ``uniform`` U(0, 1), clipped."""

    def __init__(self, kind: str, num_samples: int, size: int, seed: int) -> None:
        self.kind, self.num_samples, self.size, self.seed = kind, num_samples, size, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        shape = (self.size, self.size, 3)
        pixels = (
            torch.randn(shape, generator=gen) * 0.25 + 0.5
            if self.kind == "gaussian"
            else torch.rand(shape, generator=gen)
        )
        return Image.fromarray((pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy()), -1


class _RGB(Dataset):
    """A torchvision data set whose images are converted to RGB (MNIST and FashionMNIST are grey)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))  # torch's Dataset declares no __len__; these are all map-style

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        img, target = self.dataset[i]
        return to_rgb8(img), int(target)


def _read_npz(path: str, key: str, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The arrays ``key`` and (if present) ``y`` of the archive at ``path``. A UserError when the file is not a
    readable .npz archive (zero bytes, truncated, failed CRC, a plain .npy, pickled objects) and a different one,
    listing what it holds, when it is readable but lacks ``key``."""
    fix = "Fix: write it with numpy.savez(path, x=uint8 images, y=int labels), or re-copy it if it was cut short."
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise UserError(f"{what}: {path!r} is a single .npy array, not a .npz archive. {fix}")
        with loaded as arrays:
            if key not in arrays.files:
                raise UserError(
                    f"{what}: {path!r} has no array {key!r} (it has {sorted(arrays.files)}). "
                    "Fix: set `key` to one of them."
                )
            return arrays[key], (arrays["y"] if "y" in arrays.files else None)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 (zipfile, zlib, EOF, pickle and format errors: "unreadable archive")
        raise UserError(
            f"{what}: cannot read {path!r} as a .npz archive: it {npz_problem(path, err)[0]}. {fix}"
        ) from err


def _labels(targets: np.ndarray | None, count: int, path: str, what: str) -> np.ndarray:
    """The labels ``y`` as int64, one per image (-1 for every image when absent); a UserError naming the fix when
    they are not one integer class index per image."""
    if targets is None:
        return np.full(count, -1, dtype=np.int64)
    if targets.ndim != 1:
        hint = " (one-hot? use y.argmax(1))" if targets.ndim == 2 else ""
        raise UserError(
            f"{what}: labels 'y' in {path!r} have shape {targets.shape}; expected one class index per "
            f"image, shape ({count},){hint}. Fix: save y as a 1-D integer array."
        )
    whole_floats = np.issubdtype(targets.dtype, np.floating) and bool(np.all(np.mod(targets, 1) == 0))
    integral = np.issubdtype(targets.dtype, np.integer) or whole_floats
    if not integral:
        raise UserError(
            f"{what}: labels 'y' in {path!r} are {targets.dtype}, not integer class indices. Fix: map "
            "them to integers 0..K-1 (e.g. np.unique(y, return_inverse=True)[1]), or drop 'y' for an "
            "unlabelled set."
        )
    if len(targets) != count:
        raise UserError(
            f"{what}: {path!r} has {count} images but {len(targets)} labels in 'y'. Fix: save one label "
            "per image (y of the same length as the images), or drop 'y' for an unlabelled OOD set."
        )
    return targets.astype(np.int64)


def _npz(spec: Mapping[str, Any], what: str) -> Source:
    path = expand_path(spec["path"], what)
    key = spec.get("key", "x")
    images, targets = _read_npz(path, key, what)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise UserError(
            f"{what}: array {key!r} in {path!r} is {images.dtype} {images.shape}; expected uint8 "
            "N×H×W×C (C = 1 or 3) or N×H×W. Fix: convert the images to uint8 HWC."
        )
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    return Source(ArraySource(images, _labels(targets, len(images), path, what)))


def _folder(spec: Mapping[str, Any], what: str) -> Source:
    root = expand_path(
        spec["path"], what, "folder", "point `path` at a folder of images (class sub-folders, or images directly in it)"
    )
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    loose = sorted(f for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTENSIONS))
    if classes and loose:
        raise UserError(
            f"{what}: folder {root!r} has class sub-folders ({_listing(classes)}) and {len(loose)} "
            f"images directly inside it ({_listing(loose)}); reading only one kind would drop the "
            "other. Fix: move the loose images into a class sub-folder, or the sub-folders out."
        )
    if classes:
        paths, targets = [], []
        for label, cls in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, cls))):
                found = sorted(os.path.join(dirpath, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
                paths += found
                targets += [label] * len(found)
    else:
        paths = [os.path.join(root, f) for f in loose]
        targets = [-1] * len(paths)
    return Source(FileSource(paths, targets), paths)


def _listing(names: list[str], shown: int = 3) -> str:
    return ", ".join(map(repr, names[:shown])) + (", ..." if len(names) > shown else "")


def _torchvision(cls: type, split_arg: str) -> Callable[[Mapping[str, Any], str], Source]:
    def build(spec: Mapping[str, Any], what: str) -> Source:
        root = expand_set_vars(spec.get("path", "."), what)
        split = spec.get("split", "test")
        kwargs = {"split": split} if split_arg == "split" else {"train": split == "train"}
        try:
            dataset = cls(root, download=bool(spec.get("download", False)), **kwargs)
        except RuntimeError as err:
            raise UserError(
                f"{what}: {cls.__name__} not found under {root!r} ({err}). Fix: set `path` to the "
                "folder holding it, or `download: true` on a machine with network access."
            ) from err
        return Source(_RGB(dataset))

    return build


def _noise(kind: str) -> Callable[[Mapping[str, Any], str], Source]:
    def build(spec: Mapping[str, Any], what: str) -> Source:
        return Source(
            NoiseSource(
                kind,
                check_int(f"{what}.num_samples", spec.get("num_samples", 1000), 1, example=1000),
                check_int(f"{what}.size", spec.get("size", 32), 1, example=32),
                check_int(f"{what}.seed", spec.get("seed", 0), 0, example=0),
            )
        )

    return build


SOURCES: dict[str, Callable[[Mapping[str, Any], str], Source]] = {
    "npz": _npz,
    "folder": _folder,
    "imglist": imglist_source,
    "cifar10": _torchvision(tvd.CIFAR10, "train"),
    "cifar100": _torchvision(tvd.CIFAR100, "train"),
    "svhn": _torchvision(tvd.SVHN, "split"),
    "mnist": _torchvision(tvd.MNIST, "train"),
    "fashionmnist": _torchvision(tvd.FashionMNIST, "train"),
    "gaussian": _noise("gaussian"),
    "uniform": _noise("uniform"),
}
_NEEDS_PATH = ("npz", "folder")


def data_identity(spec: Any) -> Any:
    """``spec`` with ``~`` and ``$VARS`` expanded in every string, and each string that names an existing file or
    folder paired with its size and modification time (a file replaced in place changes the identity)."""
    if isinstance(spec, Mapping):
        return {str(k): data_identity(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [data_identity(v) for v in spec]
    if not isinstance(spec, str):
        return spec
    expanded = expand_user_vars(spec)
    path = expanded.split(":", 1)[1] if ":" in expanded and not os.path.exists(expanded) else expanded
    if not os.path.exists(path):
        return expanded
    stat = os.stat(path)
    return {"value": expanded, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def parse_spec(spec: str | Mapping[str, Any], what: str) -> dict[str, Any]:
    """Normalise a spec: ``"kind:path"`` or ``"kind"`` becomes ``{"kind": ..., "path": ...}``."""
    if isinstance(spec, str):
        kind, _, path = spec.partition(":")
        spec = {"kind": kind, **({"path": path} if path else {})}
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise UserError(
            f"{what}: a data set spec needs a `kind` (got {spec!r}). Fix: e.g. "
            "{kind: npz, path: $DATASETS/mnist_test.npz} or the string 'folder:/data/inat'."
        )
    spec = dict(spec)
    spec["kind"] = str(spec["kind"]).lower()
    if spec["kind"] not in SOURCES:
        raise UserError(f"{what}: unknown data set kind {spec['kind']!r}. Fix: use one of {sorted(SOURCES)}.")
    if spec["kind"] in _NEEDS_PATH and not spec.get("path"):
        raise UserError(
            f"{what}: kind {spec['kind']!r} needs a `path` (got {spec.get('path')!r}). Fix: set `path` "
            "to the .npz file or image folder, e.g. $DATASETS/mnist_test.npz."
        )
    return spec


def _slice(text: str, what: str, key: str) -> slice:
    """A Python slice written as a string: ``"0::10"`` (every 10th sample), ``":1000"``, ``"1000:"``."""
    try:
        parts = [int(p) if p.strip() else None for p in str(text).split(":")]
        if not 2 <= len(parts) <= 3 or (len(parts) == 3 and parts[2] == 0):
            raise ValueError(text)
        return slice(*parts)
    except ValueError:
        raise UserError(
            f"{what}: {key}: {text!r} is not a slice. Fix: write start:stop[:step] with a non-zero "
            "step, e.g. '0::10' for every 10th sample or ':1000' for the first 1000."
        ) from None


def _subset(source: Source, keep: list[int]) -> Source:
    return Source(
        torch.utils.data.Subset(source.dataset, keep), None if source.paths is None else [source.paths[i] for i in keep]
    )


def build_source(spec: str | Mapping[str, Any], what: str) -> Source:
    """Build the data set a spec describes. ``select``/``exclude`` (slice strings such as ``"0::10"``) keep or
    drop the samples at those positions, so one array can give a fit split and a disjoint test split;
    then ``limit: N`` keeps a fixed, seeded random subset of N samples."""
    spec = parse_spec(spec, what)
    source = SOURCES[spec["kind"]](spec, what)
    positions: Sequence[int] = range(len(source))
    if "select" in spec:
        positions = positions[_slice(spec["select"], what, "select")]
    if "exclude" in spec:
        dropped = set(positions[_slice(spec["exclude"], what, "exclude")])
        positions = [i for i in positions if i not in dropped]
    if len(positions) < len(source):
        source = _subset(source, list(positions))
    if len(source) == 0:
        raise UserError(
            f"{what}: the data set at {spec.get('path', spec['kind'])!r} is empty. Fix: check the "
            "path (and select/exclude); OOD metrics need at least one sample per set."
        )
    limit = spec.get("limit")
    if limit is not None and check_int(f"{what}.limit", limit, 1, example=1000) < len(source):
        keep = torch.randperm(len(source), generator=torch.Generator().manual_seed(0))[: int(limit)].sort().values
        source = _subset(source, keep.tolist())
    return source
