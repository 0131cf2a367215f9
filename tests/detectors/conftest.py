"""The hand-made ID fit data the detector tests share."""

from __future__ import annotations

import pytest
import torch

N, D, K = 240, 12, 5


@pytest.fixture(scope="module")
def fit_data() -> dict[str, torch.Tensor]:
    """Float64 ID fit data from a random linear classifier: non-negative features, labels, logits = W h + b,
    plus a test batch with a few shifted (OOD-like) rows."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(K, D, generator=g, dtype=torch.float64), torch.randn(K, generator=g, dtype=torch.float64)
    labels = torch.arange(N) % K
    centers = torch.rand(K, D, generator=g, dtype=torch.float64) * 3
    features = (centers[labels] + torch.randn(N, D, generator=g, dtype=torch.float64)).relu()
    test = torch.cat(
        [
            (centers[:3] + torch.randn(3, D, generator=g, dtype=torch.float64)).relu(),
            torch.rand(5, D, generator=g, dtype=torch.float64) * 8,
        ]
    )
    return {
        "features": features,
        "logits": features @ weight.T + bias,
        "labels": labels,
        "weight": weight,
        "bias": bias,
        "test": test,
        "test_logits": test @ weight.T + bias,
    }
