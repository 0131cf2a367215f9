"""BFAct (``bfact@<percentile>@<n>``) equals the reimplementation in Qinyu-Allen-Zhao/OptFSOOD
``detector/bfact.py`` on hand-made tensors; its spec and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from ash_lightning.errors import UserError
from ash_lightning.shaping.bfact import bfact
from ash_lightning.shaping.calibration import calibrate
from ash_lightning.shaping.hooks import attach_shaping
from ash_lightning.shaping.specs import get_shaping, list_shapings
from tests.shaping.test_calibration import Net


def reference_threshold(feature_train: np.ndarray, p: float = 95) -> float:
    """Transcription of ``BFact.setup`` without the surrogate: ``np.percentile`` of the flattened ID features."""
    return float(np.percentile(feature_train.flatten(), p))


def reference_softcap(x: Tensor, threshold: float, n: int) -> Tensor:
    """Transcription of ``BFact.softcap``."""
    return (1 / ((1 + ((x / threshold) ** (2 * n))) ** 0.5)) * x


def test_bfact_by_hand() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0, -2.0, 4.0]])
    # tau = 2, n = 2: x / sqrt(1 + (x / 2)^4): 1 / sqrt(1 + 1/16), 2 / sqrt(2), 4 / sqrt(17)
    want = torch.tensor([[0.0, 1 / (17 / 16) ** 0.5, 2**0.5, -(2**0.5), 4 / 17**0.5]])
    torch.testing.assert_close(bfact(x, 2.0), want)
    torch.testing.assert_close(bfact(x, 2.0, 1), x / (1 + (x / 2) ** 2) ** 0.5)
    assert bfact(x.half(), 2.0).dtype == torch.float16


@pytest.mark.parametrize("spec, p, n", [("bfact", 95, 2), ("bfact@90", 90, 2), ("bfact@80@3", 80, 3)])
def test_bfact_equals_the_authors_code(spec: str, p: float, n: int) -> None:
    generator = torch.Generator().manual_seed(int(p) + n)
    fit = torch.randn(40, 16, generator=generator).relu() * 3
    test = torch.randn(7, 16, generator=generator) * 4  # negatives and values far above tau
    weight, bias = torch.randn(5, 16, generator=generator), torch.randn(5, generator=generator)
    net = Net(weight, bias)
    shaper = calibrate(net, spec, [fit[:15], fit[15:]])
    threshold = reference_threshold(fit.numpy(), p)  # float32 features, as the authors'
    assert shaper.spec == f"bfact@{p}@{n}" and shaper.percentile == p
    assert shaper.params[0] == pytest.approx(threshold, rel=1e-6, abs=0) and shaper.params[1] == n
    with torch.no_grad():
        want = reference_softcap(test, threshold, n)
        torch.testing.assert_close(shaper(test), want, rtol=1e-6, atol=1e-6)
        with attach_shaping(net, shaper):
            energy = torch.logsumexp(net(test), 1)
        torch.testing.assert_close(energy, torch.logsumexp(net.fc(want), 1), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(shaper(test), test)


def test_bfact_spec_and_refusals() -> None:
    assert get_shaping("bfact").spec == get_shaping("bfact@95@2").spec == "bfact@95@2"
    for spec, reason in (
        ("bfact@101", r"<percentile>=101 is outside \[0, 100\]"),
        ("bfact@95@0", r"<n>=0 is not a filter order"),
        ("bfact@95@1.5", r"<n> must be an integer, got '1\.5'"),
        ("bfact@95@2@1", r"bfact takes 0 to 2 parameter"),
    ):
        with pytest.raises(ValueError, match=rf"Invalid shaping spec '{spec}': {reason}"):
            get_shaping(spec)
    half_zeros = torch.rand(20, 10) * (torch.arange(10) >= 5)  # half of the ID activations are 0
    with pytest.raises(UserError, match=r"bfact@40@2: the ID 40th percentile of the activations is 0.*Fix:"):
        calibrate(Net(torch.ones(2, 10), torch.zeros(2)), "bfact@40", [half_zeros])
    entry = {e.name: e for e in list_shapings()}["bfact"]
    assert entry.form == "bfact[@<percentile>=95][@<n>=2]"
    for part in ("Kong & Li", "x / sqrt(1 + (x / τ)^(2n))", "OptFSOOD detector/bfact.py"):
        assert part in entry.description
