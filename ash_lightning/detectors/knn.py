"""Nearest-neighbour detectors on a bank of L2-normalised ID fit features: ``knn@K[@fraction]`` and
``nnguide@K[@fraction]``.

* ``knn@K`` (Sun et al., "Out-of-Distribution Detection with Deep Nearest Neighbors", ICML 2022):
  score = -||z - z_(K)||, z = h / ||h|| and z_(K) the K-th nearest normalised fit feature. OpenOOD v1.5
  (``openood/postprocessors/knn_postprocessor.py``) and the authors' code return -||z - z_(K)||^2 (faiss
  ``IndexFlatL2`` reports squared distances) and normalise as ``h / ||h|| + 1e-10``; the square is monotone, so
  the ranking (and every metric) is the same; we return the paper's distance.
* ``nnguide@K`` (Park et al., "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023):
  bank vectors g_i = z_i * E(x_i) with E = logsumexp(logits) the fit sample's energy score; score = E(x) *
  mean of the K largest inner products <z, g_i>. As OpenOOD v1.5's ``nnguide_postprocessor.py`` (faiss
  ``IndexFlatIP``; its default K = 100 and bank = 1% of the training set, ``nnguide@100@0.01``).

``fraction`` < 1 keeps a random subset of round(fraction * N) fit samples as the bank, drawn with the detector's
``seed`` (default 0) so that a fit is reproducible. Neighbours are found with a batched matrix product and
``topk`` over bank chunks of at most ``chunk`` rows, on the features' device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ash_lightning.detectors.base import FeatureDetector, compute_dtype

__all__ = ["KNN", "NNGuide", "top_inner_products"]


def top_inner_products(queries: Tensor, bank: Tensor, k: int, chunk: int = 16384) -> tuple[Tensor, Tensor]:
    """The ``k`` largest inner products of each query (B, D) with the bank rows (N, D), descending, and the bank
    indices they come from, both (B, k); the bank is read ``chunk`` rows at a time (memory B x (chunk + k))."""
    best_values = queries.new_empty(queries.shape[0], 0)
    best_indices = torch.empty(queries.shape[0], 0, dtype=torch.long, device=queries.device)
    for start in range(0, bank.shape[0], chunk):
        values = torch.cat([best_values, queries @ bank[start : start + chunk].T], 1)
        indices = torch.cat(
            [
                best_indices,
                torch.arange(start, start + min(chunk, bank.shape[0] - start), device=queries.device).expand(
                    queries.shape[0], -1
                ),
            ],
            1,
        )
        best_values, positions = values.topk(min(k, values.shape[1]), dim=1)
        best_indices = indices.gather(1, positions)
    return best_values, best_indices


@dataclass(frozen=True)
class _BankDetector(FeatureDetector):
    """Shared by ``knn`` and ``nnguide``: K neighbours from a seeded random ``fraction`` of the fit set."""

    k: int
    fraction: float = 1.0
    seed: int = field(default=0, metadata={"spec": False})
    chunk: int = field(default=16384, metadata={"spec": False})

    def __post_init__(self) -> None:
        if self.k < 1:
            raise self.invalid(f"K (number of neighbours) must be an integer >= 1, got {self.k!r}.")
        if not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
            raise self.invalid(
                f"fraction (share of the fit set kept as the bank) must be in (0, 1], got {self.fraction!r}."
            )

    def bank_rows(self, n: int, device: torch.device) -> Tensor:
        """The fit rows kept in the bank: all when ``fraction`` is 1, else round(fraction * n) drawn with ``seed``
        (at least K, else a UserError)."""
        keep = n if self.fraction == 1 else round(self.fraction * n)
        if keep < self.k:
            raise self.invalid(
                f"the bank holds {keep} of the {n} fit samples, fewer than K = {self.k}. "
                "Fix: use more fit data, a larger fraction or a smaller K."
            )
        if keep == n:
            return torch.arange(n, device=device)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n, generator=generator)[:keep].sort().values.to(device)


@dataclass(frozen=True)
class KNN(_BankDetector):
    """``knn@K[@fraction]``: -distance to the K-th nearest normalised bank feature. Stats: ``bank`` (N', D)."""

    name: ClassVar[str] = "knn"

    def fit_stats(
        self, features: Tensor, logits: Tensor, labels: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, Tensor]:
        bank = features[self.bank_rows(features.shape[0], features.device)]
        return {"bank": F.normalize(bank.to(compute_dtype(bank)), dim=1)}

    def score_batch(self, stats: Mapping[str, Tensor], features: Tensor, logits: Tensor) -> Tensor:
        queries = F.normalize(features, dim=1)
        _, indices = top_inner_products(queries, stats["bank"], self.k, self.chunk)
        return -(queries - stats["bank"][indices[:, -1]]).norm(dim=1)


@dataclass(frozen=True)
class NNGuide(_BankDetector):
    """``nnguide@K[@fraction]``: energy times the mean of the K largest <z, z_i E_i>. Stats: ``bank`` (N', D) of
    energy-scaled normalised features."""

    name: ClassVar[str] = "nnguide"

    def fit_stats(
        self, features: Tensor, logits: Tensor, labels: Tensor | None, weight: Tensor | None, bias: Tensor | None
    ) -> dict[str, Tensor]:
        rows = self.bank_rows(features.shape[0], features.device)
        dtype = compute_dtype(features)
        energy = torch.logsumexp(logits[rows].to(dtype), dim=1)
        return {"bank": F.normalize(features[rows].to(dtype), dim=1) * energy[:, None]}

    def score_batch(self, stats: Mapping[str, Tensor], features: Tensor, logits: Tensor) -> Tensor:
        values, _ = top_inner_products(F.normalize(features, dim=1), stats["bank"], self.k, self.chunk)
        return torch.logsumexp(logits, dim=1) * values.mean(1)
