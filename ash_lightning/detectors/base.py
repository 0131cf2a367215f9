"""The detector contract: a frozen dataclass of spec parameters, fitted once on ID data into plain tensors.

A detector scores samples, higher = more in-distribution, like ``ash_lightning.scores.functional``. Two kinds:

* :class:`FeatureDetector` reads the penultimate features ``h`` (B, D) and the logits (B, K):
  ``fitted = detector.fit(features, logits, labels, weight, bias)`` on ID fit data, then
  ``fitted.score(features, logits)`` per batch. ``weight`` (K, D) and ``bias`` (K,) are the classifier's.
* an input-space detector (ODIN, AdaSCALE) needs the model and the input batch, and gradients.

The fitted state is a :class:`FittedDetector`: the detector and a dict of tensors, so that
``fitted.state_dict()`` can be cached with ``torch.save`` and restored by ``ash_lightning.detectors.load_fitted``.
Each detector says what it needs: ``needs_labels`` (class labels in the fit data), ``needs_fit`` (ID fit data
at all), ``needs_gradients`` (a backward pass through the model at test time).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from ash_lightning._registry import format_number
from ash_lightning.errors import UserError

__all__ = ["Detector", "FeatureDetector", "FittedDetector", "class_means", "compute_dtype"]


def compute_dtype(t: Tensor) -> torch.dtype:
    """float32, or ``t``'s dtype when it is a wider float (float64): detectors never compute in half precision."""
    return torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32


def class_means(features: Tensor, classes: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """The mean (C, D) of the rows of ``features`` (N, D) of each class in ``classes`` (N,) (zero for a class
    without rows), and the row count (C,) of each, in ``features``' dtype."""
    classes = classes.to(device=features.device, dtype=torch.long)
    sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, classes, features)
    counts = torch.bincount(classes, minlength=num_classes)
    return sums / counts.clamp_min(1)[:, None].to(features.dtype), counts


@dataclass(frozen=True)
class Detector(ABC):
    """A detector's spec parameters (its ``spec`` fields, in spec order) and what it needs."""

    name: ClassVar[str]
    needs_labels: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = False

    @classmethod
    def spec_fields(cls) -> tuple[Any, ...]:
        """The dataclass fields written in the spec string, in order (fields with ``metadata={"spec": False}``
        are settable in Python only)."""
        return tuple(f for f in fields(cls) if f.metadata.get("spec", True))

    @property
    def spec(self) -> str:
        """The normalised spec, trailing parameters equal to their defaults left out: ``knn@50``, ``vim@64``."""
        values = [(getattr(self, f.name), f.default) for f in self.spec_fields()]
        while values and values[-1][0] == values[-1][1]:
            values.pop()
        return "@".join([self.name, *(format_number(value) for value, _ in values)])

    def invalid(self, reason: str) -> UserError:
        """The error for a bad parameter value or fit input, naming the spec."""
        return UserError(f"{self.spec}: {reason}")

    @abstractmethod
    def score_fitted(self, stats: Mapping[str, Tensor], *inputs: Any) -> Tensor:
        """The score (B,) of a batch from the fitted ``stats``; ``inputs`` as :meth:`FittedDetector.score` says."""


@dataclass(frozen=True)
class FittedDetector:
    """A detector with its fitted statistics: ``score(*inputs) == detector.score_fitted(stats, *inputs)``.

    For a :class:`FeatureDetector` the inputs are ``(features (B, D), logits (B, K))``; for AdaSCALE
    ``(forward, x, weight, bias)``. ``stats`` holds tensors only (numbers as 0-d tensors).
    """

    detector: Detector
    stats: Mapping[str, Tensor]

    @property
    def spec(self) -> str:
        return self.detector.spec

    def score(self, *inputs: Any) -> Tensor:
        return self.detector.score_fitted(self.stats, *inputs)

    def state_dict(self) -> dict[str, Any]:
        """``{"spec": str, "stats": {name: tensor}}``, for ``torch.save``; see ``load_fitted``."""
        return {"spec": self.spec, "stats": dict(self.stats)}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FittedDetector:
        """A copy with the statistics on ``device`` and, for floating-point ones, in ``dtype``."""
        return FittedDetector(
            self.detector,
            {
                key: value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
                for key, value in self.stats.items()
            },
        )


def _check_matrix(detector: Detector, name: str, t: Tensor, rows: int | None = None) -> None:
    if t.ndim != 2 or (rows is not None and t.shape[0] != rows):
        expected = f"({rows}, n)" if rows is not None else "(batch, n)"
        raise detector.invalid(f"{name} must have shape {expected}, got {tuple(t.shape)}.")


class FeatureDetector(Detector):
    """A detector on the penultimate features and logits (see the module docstring for the call pattern).

    ``needs_classifier`` says whether :meth:`fit` reads the classifier's ``weight`` and ``bias``.
    """

    needs_classifier: ClassVar[bool] = False

    def fit(
        self,
        features: Tensor,
        logits: Tensor,
        labels: Tensor | None = None,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
    ) -> FittedDetector:
        """Fit on ID data: ``features`` (N, D), ``logits`` (N, K), ``labels`` (N,) class indices, the classifier's
        ``weight`` (K, D) and ``bias`` (K,) (zeros when None). Covariances and projections are estimated in
        float64; the statistics are stored on the features' device in their float dtype (float32 or wider). A
        detector with ``needs_fit = False`` ignores the data (empty tensors will do)."""
        _check_matrix(self, "fit features", features)
        _check_matrix(self, "fit logits", logits, features.shape[0])
        if self.needs_labels:
            if labels is None:
                raise self.invalid(
                    "needs the class labels of the fit data (ID data with labels, e.g. the "
                    "training set) to estimate class means; none were given."
                )
            if labels.shape != (features.shape[0],):
                raise self.invalid(f"fit labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}.")
            if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
                raise self.invalid(
                    f"fit labels must be class indices in [0, {logits.shape[1]}) (the classifier's "
                    f"classes), got values in [{int(labels.min())}, {int(labels.max())}]."
                )
        if self.needs_classifier:
            if weight is None:
                raise self.invalid("needs the classifier's weight (K, D) and bias (K,) to fit.")
            if weight.shape != (logits.shape[1], features.shape[1]):
                raise self.invalid(
                    f"classifier weight must have shape {(logits.shape[1], features.shape[1])}, "
                    f"got {tuple(weight.shape)}."
                )
            if bias is None:
                bias = weight.new_zeros(weight.shape[0])
        self.check_feature_dim(features.shape[1])
        if self.needs_fit and features.shape[0] < 2:
            raise self.invalid(f"needs at least 2 fit samples, got {features.shape[0]}.")
        dtype = compute_dtype(features)
        stats = self.fit_stats(features, logits, labels, weight, bias)
        return FittedDetector(
            self, {key: value.to(dtype) if value.is_floating_point() else value for key, value in stats.items()}
        )

    def check_feature_dim(self, dim: int) -> None:
        """A UserError when the detector is undefined on ``dim``-dimensional features (e.g. a subspace dimension
        not below ``dim``); called by :meth:`fit`, and by ``check_detectors`` before any backbone pass."""

    @abstractmethod
    def fit_stats(
        self, features: Tensor, logits: Tensor, labels: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, Tensor]:
        """The fitted statistics (checked inputs; see :meth:`fit`)."""

    def score_fitted(self, stats: Mapping[str, Tensor], *inputs: Any) -> Tensor:
        features, logits = inputs
        _check_matrix(self, "features", features)
        _check_matrix(self, "logits", logits, features.shape[0])
        dtype = compute_dtype(features)
        return self.score_batch(
            {
                key: value.to(features.device, dtype if value.is_floating_point() else None)
                for key, value in stats.items()
            },
            features.to(dtype),
            logits.to(dtype),
        )

    @abstractmethod
    def score_batch(self, stats: Mapping[str, Tensor], features: Tensor, logits: Tensor) -> Tensor:
        """The score (B,) from ``stats`` on the features' device, all in one float dtype (float32 or float64)."""
