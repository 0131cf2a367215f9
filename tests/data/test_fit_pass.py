"""ash_lightning.data.fit_pass: the one pass over ID fit data that calibration and detector fitting share."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ash_lightning.data.fit_pass import FitBatch, FitPass, fit_batches
from ash_lightning.errors import UserError


class _Seen(nn.Module):
    """Records whether it ran in training mode and with gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.modes: list[tuple[bool, bool]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.modes.append((self.training, torch.is_inference_mode_enabled()))
        return x * self.scale


def _loader(n: int, corrupt: list[int] = (), batch_size: int = 4) -> DataLoader:
    index = torch.arange(n)
    index[list(corrupt)] = -index[list(corrupt)] - 1  # the data module's mark of a skipped corrupt file
    return DataLoader(TensorDataset(torch.arange(float(n)), torch.arange(n) % 3, index), batch_size=batch_size)


def _taken(fit: FitPass, model: nn.Module | None = None) -> tuple[list[FitBatch], int]:
    batches: list[FitBatch] = []
    seen = fit.run(model or _Seen(), batches.append, what="the test", no_data="no fit data here")
    return batches, seen


def test_drops_corrupt_samples_cuts_at_max_samples_and_keeps_labels_aligned() -> None:
    batches, seen = _taken(FitPass(lambda: _loader(10, corrupt=[1, 5]), max_samples=6))
    images = torch.cat([b.images for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert seen == 6 and images.tolist() == [0.0, 2.0, 3.0, 4.0, 6.0, 7.0]
    assert labels.tolist() == [int(i) % 3 for i in images.tolist()]
    assert len(batches) == 2  # the pass stops once max_samples are taken


def test_labels_absent_or_misaligned_read_as_none() -> None:
    unlabelled = FitPass(lambda: [torch.rand(3, 2)])
    ((batch,), _) = _taken(unlabelled)
    assert batch.labels is None and batch.images.shape == (3, 2)
    misaligned = FitPass(lambda: [(torch.rand(3, 2), torch.zeros(2))])
    ((batch,), _) = _taken(misaligned)
    assert batch.labels is None


def test_eval_mode_and_grad_mode_are_set_for_the_pass_and_restored() -> None:
    model = _Seen().train()
    FitPass(lambda: _loader(5)).run(model, lambda b: model(b.images), what="the test", no_data="-")
    assert model.modes == [(False, True), (False, True)] and model.training
    model.modes.clear()
    with torch.inference_mode():
        FitPass(lambda: _loader(2)).run(
            model,
            lambda b: model(b.images),
            what="the test",
            no_data="-",
            grad_mode=lambda: torch.inference_mode(False),
        )
    assert model.modes == [(False, False)]


def test_no_data_and_no_samples_are_user_errors() -> None:
    with pytest.raises(UserError, match="no fit data here"):
        _taken(FitPass(lambda: None))
    with pytest.raises(UserError, match=r"has no samples, so the test cannot be fitted\. Fix:"):
        _taken(FitPass(lambda: _loader(2, corrupt=[0, 1])))
    with pytest.raises(ValueError, match="max_samples must be a positive number"):
        FitPass(lambda: None, max_samples=0)


def test_device_and_fit_batches() -> None:
    assert FitPass(lambda: None).device_of(_Seen()) == torch.device("cpu")
    assert FitPass(lambda: None, device=torch.device("meta")).device_of(_Seen()) == torch.device("meta")
    loader = _loader(3)
    assert fit_batches(loader) is loader and fit_batches(lambda: loader) is loader
