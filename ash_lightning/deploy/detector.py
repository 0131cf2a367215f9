"""``OODDetector``: one chosen setting (network, shaping, score or fitted detector, threshold) as a plain callable,
``detector(images) -> (scores, is_ood)``; ``load_detector(run_dir)`` builds it from a finished run.

It holds no Lightning module: the network (an ``nn.Module``) with the shaping attached at ``placement`` while it
runs, and the score, computed as ``main.py test``/``predict`` compute them (``shaping.sweep``,
``detectors.scoring``). A sample is flagged OOD when its score (higher = more in-distribution) is below the
threshold, compared in float64: the run's FPR at its TPR is exactly the fraction of an OOD set it does not flag.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ash_lightning.data.progress import terminal_progress
from ash_lightning.deploy.run_folder import RunSetting, run_config, run_results, run_setting
from ash_lightning.detectors import Detector, FittedDetector
from ash_lightning.detectors.fitting import fit_detector
from ash_lightning.detectors.scoring import detector_scores, resolve_score
from ash_lightning.errors import UserError
from ash_lightning.shaping.calibration import FitData, calibrate, needs_calibration
from ash_lightning.shaping.specs import Shaper, get_shaping
from ash_lightning.shaping.sweep import shaped_logits

__all__ = ["OODDetector", "flag_ood", "load_detector"]


def flag_ood(scores: Tensor, threshold: float) -> Tensor:
    """``is_ood``: ``scores < threshold``, compared in float64 (the run's saved scores are float64 copies)."""
    return scores.double() < threshold


class OODDetector:
    """``detector(images)`` -> ``(scores (B,), is_ood (B,))`` on the images' device, for ``model`` with ``shaping``
    (a spec or a fitted ``Shaper``) attached at ``placement`` and ``score`` (a score name such as ``"energy"``,
    a detector needing no fit such as ``"odin"``, or a ``FittedDetector`` from ``fit_detector``); a sample is
    OOD when its score < ``threshold``. ``std``: the data transform's per-channel std (ODIN's step; default ones).
    ``transform``: the image transform the run used (``load_detector`` sets it), for the caller's PIL images.

    Example:
        >>> import timm, torch
        >>> import ash_lightning.models  # noqa: F401 (registers cifar_resnet20)
        >>> from ash_lightning import OODDetector
        >>> detector = OODDetector(timm.create_model("cifar_resnet20"), "ash_s@90", "energy", threshold=2.0)
        >>> scores, is_ood = detector(torch.rand(4, 3, 32, 32))
        >>> bool(((scores < 2.0) == is_ood).all())
        True
    """

    def __init__(
        self,
        model: nn.Module,
        shaping: str | Shaper,
        score: str | Callable[[Tensor], Tensor] | Detector | FittedDetector,
        threshold: float,
        *,
        placement: str = "penultimate",
        std: Sequence[float] | None = None,
        transform: Callable[[Any], Tensor] | None = None,
    ) -> None:
        self.model, self.placement, self.std, self.transform = model, placement, std, transform
        self.shaper = shaping if isinstance(shaping, Shaper) else get_shaping(shaping)
        if needs_calibration(self.shaper):
            raise ValueError(
                f"shaping {self.shaper.spec} needs ID statistics; pass the fitted shaper "
                f"calibrate(model, {self.shaper.spec!r}, <ID loader>, placement) instead of its spec."
            )
        resolved = resolve_score(score) if isinstance(score, str) else score
        if isinstance(resolved, Detector):
            if resolved.needs_fit:
                raise ValueError(
                    f"detector {resolved.spec} needs fitting; pass fit_detector(model, {resolved.spec!r}, "
                    "<ID loader>, placement, shaping) instead of its spec."
                )
            resolved = FittedDetector(resolved, {})
        self.score = resolved
        self.threshold = float(threshold)

    def scores(self, images: Tensor) -> Tensor:
        """The scores (B,) of a batch of transformed images (B, C, H, W), on their device."""
        self.model.to(images.device).eval()
        if isinstance(self.score, FittedDetector):
            self.score = self.score.to(images.device)
            return detector_scores(self.model, self.score, images, self.shaper, self.placement, self.std)
        with torch.no_grad():
            return self.score(shaped_logits(self.model, images, [self.shaper], self.placement)[0])

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.scores(images)
        return scores, flag_ood(scores, self.threshold)

    def __repr__(self) -> str:
        name = self.score.spec if isinstance(self.score, FittedDetector) else getattr(self.score, "name", self.score)
        return f"OODDetector({type(self.model).__name__}, {self.shaper.spec} + {name}, threshold={self.threshold:g})"


def load_detector(
    run_dir: str | os.PathLike[str],
    shaping: str | None = None,
    score: str | None = None,
    *,
    model: nn.Module | None = None,
    fit_data: FitData | None = None,
    placement: str = "penultimate",
    device: torch.device | str = "cpu",
) -> OODDetector:
    """The detector of a finished run: its selected setting (``ash_lightning.deploy.run_folder``; ``shaping`` and
    ``score`` pick another of its settings) with its threshold.

    A ``main.py`` run folder gives the rest: its ``config.yaml`` builds the network (backbone and checkpoint) and
    the transform; calibrated shapings and fitted detectors come from the caches ``main.py`` filled, or are
    refitted on the run's ``data.fit`` (on ``device``). For a run of the callbacks in your own project, pass your
    network as ``model`` (its ``placement``) and, for settings fitted on ID data, that data as ``fit_data``.
    """
    results = run_results(run_dir)
    setting = run_setting(results, shaping, score)
    if model is not None:
        return _with_model(model, setting, fit_data, placement, device)
    config = run_config(run_dir, results)
    if not (config.get("model") or {}).get("backbone"):
        raise UserError(
            f"{str(run_dir)!r} has no main.py config.yaml naming the network (a run of the callbacks?). Fix: pass "
            "your network: load_detector(run_dir, model=net, fit_data=<ID loader, for fitted settings>)."
        )
    return _from_config(config, setting, device)


def _from_config(config: dict[str, Any], setting: RunSetting, device: torch.device | str) -> OODDetector:
    from timm.data import create_transform

    from ash_lightning.data import OODDataModule
    from ash_lightning.module import OODEvalModule

    model_args = {**config["model"], "shaping": setting.shaping, "score": setting.score, "feature_cache": None}
    module = OODEvalModule(**model_args).to(device)
    datamodule = OODDataModule(**{**config["data"], "backbone": model_args["backbone"]})
    module.fit_on_id_data(datamodule, terminal_progress())
    data_config = datamodule.data_config()
    fitted = module.fitted[0].get(setting.score)
    return OODDetector(
        module.model,
        module.shapers[0],
        fitted if fitted is not None else module.scores[0],
        setting.threshold["value"],
        placement=module.placement,
        std=data_config["std"],
        transform=create_transform(**data_config, is_training=False),
    )


def _with_model(
    model: nn.Module, setting: RunSetting, fit_data: FitData | None, placement: str, device: torch.device | str
) -> OODDetector:
    model = model.to(device)
    shaper, resolved = get_shaping(setting.shaping), resolve_score(setting.score)
    fits = isinstance(resolved, Detector) and resolved.needs_fit
    if not (needs_calibration(shaper) or fits):
        return OODDetector(model, shaper, resolved, setting.threshold["value"], placement=placement)
    if fit_data is None:
        raise UserError(
            f"{setting.shaping} + {setting.score} is fitted on ID data. Fix: pass it: "
            "load_detector(run_dir, model=net, fit_data=<the ID loader the run fitted on>)."
        )
    shaper = calibrate(model, shaper, fit_data, placement, device=torch.device(device))
    score: Callable[[Tensor], Tensor] | Detector | FittedDetector = resolved
    if fits:
        score = fit_detector(model, setting.score, fit_data, placement, shaper, device=torch.device(device))
    return OODDetector(model, shaper, score, setting.threshold["value"], placement=placement)
