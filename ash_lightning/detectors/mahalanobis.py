"""Mahalanobis detectors on the penultimate features: ``mds`` (Lee et al., NeurIPS 2018) and ``rmds`` (Ren et al.,
"A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection", 2021).

With class means mu_c and one covariance Sigma shared by the classes (fit on the labelled ID fit data, ``1/N``
normalisation), MD_c(h) = (h - mu_c)^T pinv(Sigma) (h - mu_c) is the squared Mahalanobis distance, and
MD_0(h) the same under one class-agnostic Gaussian (mean mu_0, covariance Sigma_0 of all fit features).

* ``mds``:  score = -min_c MD_c(h)  (Lee et al.'s confidence score M(x), without input preprocessing and
  feature ensemble, as OpenOOD v1.5's ``mds``);
* ``rmds``: score = -min_c (MD_c(h) - MD_0(h)).

Checked against OpenOOD v1.5, ``openood/postprocessors/mds_postprocessor.py`` and ``rmds_postprocessor.py``
(sklearn ``EmpiricalCovariance`` whose precision is ``scipy.linalg.pinvh`` with cutoff D * eps of the features'
dtype, which we mirror). Classes without fit samples get no Gaussian (the minimum runs over the others).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ash_lightning.detectors.base import FeatureDetector, class_means

__all__ = ["MDS", "RMDS", "squared_mahalanobis", "whitener"]


def whitener(covariance: Tensor, rtol: float) -> Tensor:
    """A (D, D) matrix A with A A^T = pinv(covariance) (symmetric PSD): eigenvectors divided by the square root
    of their eigenvalue, zero for eigenvalues <= ``rtol`` times the largest (as ``pinvh``'s cutoff)."""
    values, vectors = torch.linalg.eigh(covariance)
    keep = values > rtol * values.abs().max()
    return vectors * torch.where(keep, values.clamp_min(torch.finfo(values.dtype).tiny).rsqrt(), 0.0)


def squared_mahalanobis(features: Tensor, center: Tensor, whitening: Tensor, whitened_means: Tensor) -> Tensor:
    """(B, C) squared distances ``||(h - center) A - m_c||^2`` to the whitened means ``m_c = (mu_c - center) A``
    (C, D), i.e. ``(h - mu_c)^T A A^T (h - mu_c)``, expanded as ``|z|^2 - 2 z.m + |m|^2`` and clamped at 0."""
    z = (features - center) @ whitening
    distances = torch.addmm(whitened_means.square().sum(1), z, whitened_means.T, alpha=-2.0)
    return distances.add_(z.square().sum(1, keepdim=True)).clamp_(min=0)


def _pinv_rtol(features: Tensor) -> float:
    """``pinvh``'s default cutoff for features of this dtype: D * eps."""
    dtype = features.dtype if features.is_floating_point() else torch.float32
    return features.shape[1] * torch.finfo(dtype).eps


def _class_gaussians(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """The means (C, D) of the classes present in ``labels`` and their shared covariance (D, D), in float64."""
    h = features.double()
    labels = labels.to(device=h.device, dtype=torch.long)
    means, counts = class_means(h, labels, num_classes)
    centered = h - means[labels]
    return means[counts > 0], centered.T @ centered / h.shape[0]


def _gaussian_stats(features: Tensor, labels: Tensor, num_classes: int) -> dict[str, Tensor]:
    """Class-conditional statistics, whitened around the fit mean (keeps the expansion well conditioned)."""
    means, covariance = _class_gaussians(features, labels, num_classes)
    center = features.double().mean(0)
    whitening = whitener(covariance, _pinv_rtol(features))
    return {"center": center, "whitener": whitening, "means": (means - center) @ whitening}


@dataclass(frozen=True)
class MDS(FeatureDetector):
    """``mds``: -min_c MD_c(h) (see the module docstring). Stats: ``center`` (D,), ``whitener`` (D, D),
    whitened class ``means`` (C, D)."""

    name: ClassVar[str] = "mds"
    needs_labels: ClassVar[bool] = True

    def fit_stats(
        self, features: Tensor, logits: Tensor, labels: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, Tensor]:
        assert labels is not None  # checked by fit()
        return _gaussian_stats(features, labels, logits.shape[1])

    def score_batch(self, stats: Mapping[str, Tensor], features: Tensor, logits: Tensor) -> Tensor:
        return -squared_mahalanobis(features, stats["center"], stats["whitener"], stats["means"]).amin(1)


@dataclass(frozen=True)
class RMDS(FeatureDetector):
    """``rmds``: -min_c (MD_c(h) - MD_0(h)). Stats: those of ``mds`` plus ``background_whitener`` (D, D) of the
    class-agnostic covariance around ``center`` (the fit mean mu_0)."""

    name: ClassVar[str] = "rmds"
    needs_labels: ClassVar[bool] = True

    def fit_stats(
        self, features: Tensor, logits: Tensor, labels: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, Tensor]:
        assert labels is not None  # checked by fit()
        stats = _gaussian_stats(features, labels, logits.shape[1])
        centered = features.double() - stats["center"]
        stats["background_whitener"] = whitener(centered.T @ centered / features.shape[0], _pinv_rtol(features))
        return stats

    def score_batch(self, stats: Mapping[str, Tensor], features: Tensor, logits: Tensor) -> Tensor:
        class_distances = squared_mahalanobis(features, stats["center"], stats["whitener"], stats["means"])
        background = ((features - stats["center"]) @ stats["background_whitener"]).square().sum(1)
        return background - class_distances.amin(1)
