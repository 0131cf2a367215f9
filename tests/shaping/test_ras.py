"""RAS (``ras``) equals gigug/RAS ``src/ras_net.py`` and ``src/ras_postprocessor.py`` on hand-made tensors."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from ash_lightning.shaping.calibration import calibrate
from ash_lightning.shaping.hooks import attach_shaping
from ash_lightning.shaping.ras import ras
from ash_lightning.shaping.specs import get_shaping, list_shapings
from tests.shaping.test_calibration import Net


def reference_mean_curve(activation_log: Tensor) -> Tensor:
    """Transcription of ``RASPostprocessor.setup``: every ID feature, sorted per sample, averaged."""
    sorted_vals, _ = torch.sort(activation_log, dim=1)
    return sorted_vals.mean(dim=0)


def reference_forward_shift(feature: Tensor, mean_curve: Tensor, fc: nn.Module, stable: bool = False) -> Tensor:
    """Transcription of ``RASNet.forward_shift`` after the backbone: the logits of the shifted features."""
    feature = feature.view(feature.size(0), -1)
    sorted_vals, idx = torch.sort(feature, dim=1, stable=stable)
    mc = mean_curve.to(feature.device).expand_as(sorted_vals)
    shifted = torch.empty_like(feature).scatter_(1, idx, mc)
    return fc(shifted)


def test_ras_by_hand() -> None:
    curve = torch.tensor([2.5, 3.5, 4.5])  # the mean of [1, 2, 3] and [4, 5, 6], i.e. of [[3, 1, 2], [5, 4, 6]] sorted
    assert torch.equal(ras(torch.tensor([[10.0, -1.0, 0.0]]), curve), torch.tensor([[4.5, 2.5, 3.5]]))
    assert torch.equal(ras(torch.tensor([[0.0, 7.0, 0.0]]), curve), torch.tensor([[2.5, 4.5, 3.5]]))  # ties by position
    maps = torch.tensor([[[[4.0, 1.0], [3.0, 2.0]]]])  # any shape: ranks over each sample's flattened values
    assert torch.equal(ras(maps, torch.arange(4.0)), torch.tensor([[[[3.0, 0.0], [2.0, 1.0]]]]))
    with pytest.raises(ValueError, match=r"ras was fitted on 3 activations per sample but got 4 .*Fix:"):
        ras(torch.rand(2, 4), curve)


@pytest.mark.parametrize("seed", [0, 1])
def test_ras_equals_the_authors_code(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    fit = torch.randn(50, 12, generator=generator).relu() * torch.linspace(0.5, 2, 12)
    test = torch.randn(6, 12, generator=generator) * 3  # no ties
    weight, bias = torch.randn(4, 12, generator=generator), torch.randn(4, generator=generator)
    net = Net(weight, bias)
    shaper = calibrate(net, "ras", [fit[:20], fit[20:]])
    assert shaper.spec == "ras" and shaper.params == ()
    curve = reference_mean_curve(fit)
    torch.testing.assert_close(shaper.fn.keywords["mean_curve"], curve, rtol=1e-6, atol=1e-6)
    with torch.no_grad(), attach_shaping(net, shaper):
        logits = net(test)
    want = reference_forward_shift(test, curve, net.fc)
    torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.logsumexp(logits, 1), torch.logsumexp(want, 1), rtol=1e-6, atol=1e-6)
    tied = test.relu()  # ReLU ties at 0: equal to the authors' code with a stable sort
    torch.testing.assert_close(shaper(tied) @ weight.T + bias, reference_forward_shift(tied, curve, net.fc, True))


def test_ras_spec_and_listing() -> None:
    with pytest.raises(ValueError, match=r"Invalid shaping spec 'ras@1': ras takes 0 parameter"):
        get_shaping("ras@1")
    entry = {e.name: e for e in list_shapings()}["ras"]
    assert entry.form == "ras"
    for part in ("Guglielmo & Masana", "c_i", "gigug/RAS src/ras_net.py"):
        assert part in entry.description
