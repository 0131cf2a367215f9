"""``OODDataModule``: one ID test set and named OOD sets as one multi-dataloader test loop.

Dataloader 0 is the ID set, then one dataloader per OOD set in the given order, then (optionally) one per
covariate-shifted ID (csid) set, whose samples count as ID in the full-spectrum metrics
(``ash_lightning.evaluation.full_spectrum``), then (optionally) the ID-validation set and the OOD-validation sets used
to select a setting without touching the test sets.
Every batch is ``(images, targets, index)``; a negative index marks a corrupt file that was skipped. A set named
in ``load_without_images`` (its features come from the feature cache) is loaded without decoding:
``(empty (B, 0) tensor, -1, index)`` batches, in the main process. ``test_set_identities`` and ``fit_identity``
say what each set's samples depend on, for the caches' keys.

The code lives in ``OODDataModuleMixin``; ``OODDataModule`` here is its ``pytorch_lightning`` class and
``ash_lightning.lightning.OODDataModule`` its ``lightning.pytorch`` one (see ``ash_lightning.lightning_packages``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pytorch_lightning as pl
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from ash_lightning._options import check_choice, check_int, check_range
from ash_lightning.data.base import CorruptImageError, Source
from ash_lightning.data.sources import build_source, data_identity
from ash_lightning.errors import UserError

if TYPE_CHECKING:
    from pytorch_lightning.utilities.parsing import AttributeDict

DatasetSpec = str | dict[str, Any]
ROLES = ("id", "ood", "csid", "val_id", "val_ood")
OnCorrupt = Literal["raise", "skip", "mark"]
TRANSFORM_OPTIONS = ("image_size", "mean", "std", "crop_pct")  # what a data module without a backbone needs
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")  # timm's eval transform names


@dataclass(frozen=True)
class LoaderInfo:
    """What a test dataloader holds: its data set name and its role (one of ``ROLES``)."""

    name: str
    role: str


@dataclass(frozen=True)
class SetIdentity:
    """What a test set's samples depend on: its ``name``, ``data`` (the spec's ``data_identity``, the transform
    config and ``skip_corrupt``) and its ``num_samples``."""

    name: str
    data: Mapping[str, Any]
    num_samples: int


class IndexedDataset(Dataset):
    """``(transform(image), target, index)``. An undecodable file raises its ``CorruptImageError`` with
    ``on_corrupt="raise"``; otherwise it gives a blank image with index -(i+1), after a warning with ``"skip"``
    and silently with ``"mark"`` (the data module then raises when the batch is evaluated). With
    ``images=False`` nothing is read: ``(empty tensor, -1, index)``."""

    def __init__(
        self,
        source: Source,
        transform: Any,
        on_corrupt: OnCorrupt,
        blank_shape: tuple[int, ...],
        images: bool = True,
    ) -> None:
        self.source, self.transform, self.on_corrupt = source, transform, on_corrupt
        self.blank_shape, self.images = blank_shape, images

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        if not self.images:
            return torch.empty(0), -1, i
        try:
            image, target = self.source.dataset[i]
        except CorruptImageError as err:
            if self.on_corrupt == "raise":
                raise
            if self.on_corrupt == "skip":
                warnings.warn(f"skipping corrupt image {err.path!r}", stacklevel=2)
            return torch.zeros(self.blank_shape), -1, -(i + 1)
        return self.transform(image), target, i


class AtInputSize:
    """``Normalize(mean, std)(ToTensor()(image))`` with no resize or crop, for images stored at the network's input
    size ``(height, width)``: OpenOOD v1.5's ``ImageNetCPreProcessor`` (``openood/evaluation_api/preprocessor.py``),
    which its evaluator applies to ImageNet-C. An image of another size is a UserError naming the set ``what``."""

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float], what: str) -> None:
        self.size, self.what = size, what
        self.normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __call__(self, image: Image.Image) -> Tensor:
        if (image.height, image.width) != self.size:
            raise UserError(
                f"{self.what}: an image is {image.height}×{image.width} pixels, but `resize: false` takes images at "
                f"the network's input size {self.size[0]}×{self.size[1]}. Fix: remove `resize: false` from that "
                "spec (its images are then resized and cropped like the others)."
            )
        return self.normalize(image)


def check_resize(spec: Any, what: str) -> None:
    """A UserError unless a spec's optional ``resize`` key is a bool."""
    if isinstance(spec, Mapping) and not isinstance(spec.get("resize", True), bool):
        raise UserError(
            f"{what}.resize: {spec['resize']!r} is not true or false. Fix: write `resize: false` for images stored at "
            "the network's input size (only converted and normalised), or leave the key out."
        )


def eval_transform(config: Mapping[str, Any], spec: Any, what: str) -> Any:
    """The test transform of a spec's images: timm's eval transform of the data ``config`` (resize, centre crop,
    normalise), or ``AtInputSize`` for a spec with ``resize: false``."""
    if isinstance(spec, Mapping) and spec.get("resize") is False:
        return AtInputSize(tuple(config["input_size"][1:]), config["mean"], config["std"], what)
    return create_transform(**config, is_training=False)


class OODDataModuleMixin:
    """ID and OOD test sets (and optional validation sets) with transforms from the backbone's timm config.

    The code of ``OODDataModule``, for a class that also subclasses a Lightning package's ``LightningDataModule``.

    Args:
        id: the ID test set spec, e.g. ``{kind: npz, path: $DATASETS/cifar10_test_jpeg.npz}``.
        ood: OOD set name -> spec, evaluated in this order.
        groups: optional group name -> OOD set names (e.g. ``near``/``far``) averaged in the results.
        val_id, val_ood: optional validation sets; the best setting of a sweep is chosen on them.
        fit: optional ID data for calibrated methods (ReAct percentile, DICE, VRA).
        predict: optional unlabelled data that ``main.py predict`` scores and flags (any spec ``ood`` takes).
        csid: optional covariate-shifted ID set name -> spec (OpenOOD v1.5's csid sets, e.g. ImageNet-V2), evaluated
            after the OOD sets: counted as ID in the full-spectrum results, with their accuracy.
        backbone: timm name whose pretrained config gives the transform (linked from the model by the CLI).
        image_size, mean, std, interpolation, crop_pct: override the backbone's data config.
        skip_corrupt: skip undecodable image files with a warning (recorded in the results) instead of failing.
            Without it the run stops when the batch holding such a file is evaluated, not while it is loaded
            (loading runs ahead, in workers and by prefetching), so every set before it is complete and saved.
    """

    if TYPE_CHECKING:  # provided by the Lightning package's LightningDataModule that this is combined with
        hparams: AttributeDict
        trainer: Any  # that package's Trainer; None until the module is attached to one

        def save_hyperparameters(self, *args: Any, **kwargs: Any) -> None: ...

    def __init__(
        self,
        id: DatasetSpec,
        ood: dict[str, DatasetSpec],
        groups: dict[str, list[str]] | None = None,
        val_id: DatasetSpec | None = None,
        val_ood: dict[str, DatasetSpec] | None = None,
        fit: DatasetSpec | None = None,
        predict: DatasetSpec | None = None,
        csid: dict[str, DatasetSpec] | None = None,
        backbone: str | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        image_size: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        skip_corrupt: bool = False,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_options(self.hparams)
        if not ood:
            raise UserError(
                "data.ood is empty: OOD evaluation needs at least one OOD set. "
                "Fix: add e.g. ood: {textures: {kind: folder, path: $DATASETS/dtd}}."
            )
        if (val_id is None) != (not val_ood):
            raise UserError("validation needs both val_id and val_ood (or neither). Fix: set the missing one.")
        unknown = sorted({n for members in (groups or {}).values() for n in members} - set(ood))
        if unknown:
            raise UserError(f"data.groups names unknown OOD sets {unknown}; the OOD sets are {list(ood)}.")
        self.groups = dict(groups or {})
        specs = [("id", LoaderInfo(_id_name(id), "id"), id)]
        specs += [(f"ood.{n}", LoaderInfo(n, "ood"), s) for n, s in ood.items()]
        specs += [(f"csid.{n}", LoaderInfo(n, "csid"), s) for n, s in _csid_sets(csid).items()]
        if val_id is not None:
            specs += [("val_id", LoaderInfo("val_id", "val_id"), val_id)]
            specs += [(f"val_ood.{n}", LoaderInfo(f"val_{n}", "val_ood"), s) for n, s in (val_ood or {}).items()]
        _check_unique_names(specs)
        for what, spec in [(what, spec) for what, _, spec in specs] + [("fit", fit), ("predict", predict)]:
            check_resize(spec, f"data.{what}")
        self._specs = specs
        self.specs: dict[str, DatasetSpec] = {info.name: spec for _, info, spec in specs}
        self.loaders: list[LoaderInfo] = [info for _, info, _ in specs]
        self.sources: dict[str, Source] = {}
        self._without_images: frozenset[str] = frozenset()
        self.predict_source: Source | None = None  # built by predict_dataloader

    @property
    def ood_names(self) -> list[str]:
        """Names of the OOD test sets in dataloader order."""
        return [info.name for info in self.loaders if info.role == "ood"]

    def data_config(self) -> dict[str, Any]:
        """The backbone's timm data config with this module's overrides applied; without a backbone, the config
        the explicit options give (``interpolation`` defaults to bilinear, centre crop)."""
        hp = self.hparams
        cfg = (
            resolve_data_config(pretrained_cfg=_pretrained_cfg(hp.backbone))
            if hp.backbone
            else {"interpolation": "bilinear", "crop_mode": "center"}
        )
        overrides = {
            "input_size": (len(hp.mean or cfg["mean"]), hp.image_size, hp.image_size) if hp.image_size else None,
            "mean": hp.mean,
            "std": hp.std,
            "interpolation": hp.interpolation,
            "crop_pct": hp.crop_pct,
        }
        cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None})
        return cfg

    def _identity(self, spec: Any) -> dict[str, Any]:
        """``spec`` with the transform config and ``skip_corrupt``: what a set's samples depend on."""
        return {"spec": spec, "transform": dict(self.data_config()), "skip_corrupt": bool(self.hparams.skip_corrupt)}

    def test_set_identities(self) -> list[SetIdentity]:
        """Each test dataloader's set, in dataloader order, with what its samples depend on (its spec's
        ``data_identity``: paths expanded, each named file's size and modification time) and its size."""
        self.setup("test")
        return [
            SetIdentity(info.name, self._identity(data_identity(self.specs[info.name])), len(self.sources[info.name]))
            for info in self.loaders
        ]

    def fit_identity(self) -> dict[str, Any] | None:
        """What the statistics fitted on the ID fit data depend on, known without reading it: the ``fit`` spec as
        written (so a cached fit needs no fit data: clear the cache after replacing the data in place), the
        transform config and ``skip_corrupt``; None without fit data."""
        return None if self.hparams.fit is None else self._identity(self.hparams.fit)

    def load_without_images(self, names: Collection[str]) -> None:
        """Load the test sets ``names`` (only those) without decoding images: their features come from the
        feature cache, so their batches carry only targets and index."""
        self._without_images = frozenset(names)

    def teardown(self, stage: str) -> None:
        """Forget ``load_without_images`` when a run ends: the next run's module names its cached sets again."""
        self._without_images = frozenset()

    def setup(self, stage: str | None = None) -> None:
        if self.sources:
            return
        for what, info, spec in self._specs:
            try:
                self.sources[info.name] = build_source(spec, f"data.{what}")
            except UserError as err:
                if info.role != "csid":
                    raise
                raise UserError(f"{err} Or leave the covariate-shifted ID sets out: --data.csid '{{}}'.") from None

    def _loader(
        self, source: Source, spec: DatasetSpec, what: str, on_corrupt: OnCorrupt, images: bool = True
    ) -> DataLoader:
        cfg = self.data_config()
        dataset = IndexedDataset(
            source,
            eval_transform(cfg, spec, what),
            "skip" if self.hparams.skip_corrupt else on_corrupt,
            tuple(cfg["input_size"]),
            images,
        )
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=False,
            num_workers=self.hparams.num_workers if images else 0,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=False,
        )

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per data set; attached to a trainer, corrupt files are marked and raised by
        ``on_before_batch_transfer`` when their batch is evaluated (unless ``skip_corrupt``). The sets named in
        ``load_without_images`` load no images."""
        self.setup("test")
        on_corrupt: OnCorrupt = "raise" if self.trainer is None else "mark"
        return [
            self._loader(
                self.sources[info.name], spec, f"data.{what}", on_corrupt, images=info.name not in self._without_images
            )
            for what, info, spec in self._specs
        ]

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Unless ``skip_corrupt``, raise the ``CorruptImageError`` of the first file marked corrupt (negative
        index) in a test batch; a batch without such files passes through unchanged."""
        index = batch[2]
        corrupt = index < 0
        if self.hparams.skip_corrupt or not bool(corrupt.any()):
            return batch
        name, i = self.loaders[dataloader_idx].name, -int(index[corrupt][0]) - 1
        self.sources[name].dataset[i]  # decoding the file again raises its CorruptImageError, with the cause
        raise CorruptImageError(self.sample_paths(name, [i])[0], "it failed to decode while its batch was loaded")

    def fit_dataloader(self) -> DataLoader | None:
        """The ID data that calibrated methods estimate their statistics on (None if not configured)."""
        if self.hparams.fit is None:
            return None
        return self._loader(build_source(self.hparams.fit, "data.fit"), self.hparams.fit, "data.fit", "raise")

    def predict_dataloader(self) -> DataLoader:
        """The ``predict`` data in its order (``main.py predict``); a UserError when it is not configured."""
        if self.hparams.predict is None:
            raise UserError(
                "main.py predict scores the images of data.predict, which is not set. Fix: pass "
                '--data.predict <spec>, any spec data.ood takes (e.g. "{kind: folder, path: images/}").'
            )
        self.predict_source = build_source(self.hparams.predict, "data.predict")
        return self._loader(self.predict_source, self.hparams.predict, "data.predict", "raise")

    def sample_paths(self, name: str, indices: list[int]) -> list[str]:
        """File paths of the given sample indices of data set ``name`` (indices where paths are unknown)."""
        paths = self.sources[name].paths
        return [paths[i] if paths is not None else str(i) for i in indices]


def _check_options(hp: Mapping[str, Any]) -> None:
    """Range checks of the numeric and named options (UserError naming the key, value, range and fix)."""
    missing = [key for key in TRANSFORM_OPTIONS if hp["backbone"] is None and hp[key] is None]
    if missing:
        raise UserError(
            f"data.backbone is not set, so the transform comes from the explicit options, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing. Fix: set data.{', data.'.join(missing)} (e.g. "
            "image_size: 32, mean: [0.49, 0.48, 0.45], std: [0.25, 0.24, 0.26], crop_pct: 1.0), or data.backbone to "
            "a timm model name whose config gives them."
        )
    check_int("data.batch_size", hp["batch_size"], 1, example=64)
    check_int("data.num_workers", hp["num_workers"], 0, example=4)
    if hp["image_size"] is not None:
        check_int("data.image_size", hp["image_size"], 1, example=224)
    if hp["crop_pct"] is not None:
        check_range("data.crop_pct", hp["crop_pct"], 0, 1, low_open=True, high_open=False, example=0.875)
    if hp["interpolation"] is not None:
        check_choice("data.interpolation", hp["interpolation"], INTERPOLATIONS)
    for value in hp["std"] or ():
        check_range("data.std", value, 0, math.inf, low_open=True, high_open=True, example=0.25)


def _check_unique_names(specs: list[tuple[str, LoaderInfo, Any]]) -> None:
    """Every data set name (the ID set's, the OOD sets', ``val_id`` and ``val_<name>``) must be unique: results,
    saved scores and groups are keyed by it, so a repeated name would silently replace a set."""
    seen: dict[str, str] = {}
    for what, info, _ in specs:
        if info.name in seen:
            raise UserError(
                f"data.{what} and data.{seen[info.name]} are both named {info.name!r}; names must be "
                "unique across data.id, data.ood, data.csid and data.val_* (results and scores are keyed by "
                "them). Fix: rename one of them."
            )
        seen[info.name] = what


def _csid_sets(csid: Any) -> dict[str, DatasetSpec]:
    """``data.csid`` as set name -> spec, ``{}`` when unset; a UserError when it is not such a mapping."""
    if csid is None:
        return {}
    if not isinstance(csid, Mapping):
        raise UserError(
            f"data.csid must map each covariate-shifted ID set's name to its spec, as data.ood does; got "
            f"{type(csid).__name__} {str(csid)[:80]!r}. Fix: e.g. csid: {{imagenet_v2: {{kind: imglist, list: "
            "$DATASETS/benchmark_imglist/imagenet/test_imagenet_v2.txt, root: $DATASETS/images_largescale}}."
        )
    return {str(name): spec for name, spec in csid.items()}


class OODDataModule(OODDataModuleMixin, pl.LightningDataModule):
    __doc__ = OODDataModuleMixin.__doc__  # LightningCLI's help shows the class docstring


def _id_name(spec: DatasetSpec) -> str:
    """The ID set's display name: its ``name`` key, else "id"."""
    return str(spec.get("name", "id")) if isinstance(spec, Mapping) else "id"


def _pretrained_cfg(backbone: str) -> dict[str, Any]:
    import ash_lightning.models  # noqa: F401  (our registered models have pretrained configs too)

    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None:
        raise UserError(f"unknown backbone {backbone!r} for the data transform. Fix: use a timm model name.")
    return cfg.to_dict()
