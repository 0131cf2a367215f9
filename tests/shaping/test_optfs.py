"""OptFS (``optfs``) equals Qinyu-Allen-Zhao/OptFSOOD ``detector/ours.py`` on hand-made tensors; its bins by hand;
its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ash_lightning.errors import UserError
from ash_lightning.shaping.calibration import calibrate
from ash_lightning.shaping.hooks import attach_shaping
from ash_lightning.shaping.optfs import bin_contributions, optfs, optfs_theta
from ash_lightning.shaping.specs import get_shaping, list_shapings
from tests.shaping.test_calibration import Net


def reference_setup(feature: np.ndarray, pred: np.ndarray, w_np: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Transcription of ``Ours.setup`` (``dynamic_weight=False``) and ``Ours.get_lc_fv_list``: the left
    boundaries, the width and theta."""
    left_b = np.quantile(feature, 1e-3)
    right_b = np.quantile(feature, 1 - 1e-3)
    width = (right_b - left_b) / 100.0
    left_boundary = np.arange(left_b, right_b, width)
    lc = w_np[pred] * feature
    lc_fv_list = []
    for b in left_boundary:
        mask = (feature >= b) & (feature < b + width)
        feat_masked = mask * lc
        res = np.mean(np.sum(feat_masked, axis=1))
        lc_fv_list.append(res)
    lc_fv_list = np.array(lc_fv_list)
    theta = lc_fv_list / np.linalg.norm(lc_fv_list, 2) * 1000
    return left_boundary, width, theta


def reference_postprocess(
    feature: Tensor, left_boundary: np.ndarray, width: float, theta: np.ndarray, fc: nn.Module
) -> tuple[Tensor, Tensor]:
    """Transcription of ``Ours.postprocess`` with ``use_ood_score='energy'``: the shaped features and the score."""
    theta_t = torch.from_numpy(theta[np.newaxis, :])
    feat_p = torch.zeros_like(feature)
    for i, x in enumerate(left_boundary):
        mask = (feature >= x) & (feature < x + width)
        feat_p += mask * feature * theta_t[0][i]
    output = fc(feat_p)
    return feat_p, torch.logsumexp(output, dim=1)


def _hand_made(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fit features (post-ReLU, with zeros), test features (some beyond the fit range, some negative), W, b."""
    generator = torch.Generator().manual_seed(seed)
    fit = (torch.randn(60, 8, generator=generator) + 0.5).relu() * torch.linspace(0.5, 3, 8)
    test = torch.randn(9, 8, generator=generator) * 2
    test[0, :3] = torch.tensor([50.0, -3.0, 0.0])
    weight, bias = torch.randn(4, 8, generator=generator), torch.randn(4, generator=generator)
    return fit, test, weight, bias


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optfs_equals_the_authors_code(seed: int) -> None:
    fit, test, weight, bias = _hand_made(seed)
    net = Net(weight, bias)
    with torch.no_grad():
        pred = (fit @ weight.T + bias).argmax(1)  # the prediction of the unshaped network, bias included
    left_boundary, width, theta = reference_setup(fit.double().numpy(), pred.numpy(), weight.double().numpy())
    assert len(left_boundary) in (100, 101)
    shaper = calibrate(net, "optfs", [fit[:25], fit[25:]])
    assert shaper.spec == "optfs" and shaper.params == (left_boundary[0], np.quantile(fit.double().numpy(), 0.999))
    np.testing.assert_allclose(shaper.fn.keywords["lefts"].numpy(), left_boundary, rtol=0, atol=1e-12)
    np.testing.assert_allclose(shaper.fn.keywords["rights"].numpy(), left_boundary + width, rtol=0, atol=1e-12)
    np.testing.assert_allclose(shaper.fn.keywords["theta"].numpy(), theta, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        want_features, want_energy = reference_postprocess(test, left_boundary, width, theta, net.fc)
        torch.testing.assert_close(shaper(test), want_features, rtol=1e-6, atol=1e-6)
        with attach_shaping(net, shaper):
            torch.testing.assert_close(torch.logsumexp(net(test), 1), want_energy, rtol=1e-6, atol=1e-6)
    assert torch.equal(shaper(test)[0, :3], torch.tensor([0.0, 0.0, 0.0]))  # beyond the range, negative, 0


def test_optfs_bins_by_hand() -> None:
    lefts, rights = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 2.0, 3.0])
    theta = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)
    x = torch.tensor([[-1.0, 0.0, 0.5, 1.0, 2.5, 3.0, 7.0]])
    assert torch.equal(optfs(x, lefts, rights.double(), theta), torch.tensor([[0.0, 0.0, 5.0, 20.0, 75.0, 0.0, 0.0]]))
    assert optfs(torch.tensor([[float("nan"), float("inf")]]), lefts, rights.double(), theta).isnan().all()
    overlapping = torch.tensor([1.5, 2.0, 3.0], dtype=torch.float64)  # bins 0 and 1 share [1, 1.5)
    assert torch.equal(optfs(torch.tensor([[1.25, 1.75]]), lefts, overlapping, theta), torch.tensor([[37.5, 35.0]]))
    half = optfs(x.half(), lefts, rights.double(), theta)
    assert half.dtype == torch.float16 and torch.equal(half.float(), optfs(x, lefts, rights.double(), theta))
    # I(b_k) by hand: the values 0, 0, 2.05, 7.05, 10, 10 give the quantiles 0 and 10, so 100 bins of width 0.1;
    # 2.05 (pred 1, W[1, 0] = -1) lies in bin 20 and 7.05 (pred 0, W[0, 0] = 2) in bin 70; 0 and 10 add nothing.
    features = torch.tensor([[0.0, 10.0], [2.05, 0.0], [7.05, 10.0]], dtype=torch.float64)
    stats = bin_contributions(features, torch.tensor([0, 1, 0]), torch.tensor([[2.0, 0.0], [-1.0, 1.0]]))
    assert (stats.low, stats.high, len(stats.values)) == (0.0, 10.0, 100)
    want = [0.0] * 100
    want[20], want[70] = -2.05 / 3, 2 * 7.05 / 3
    assert stats.values == pytest.approx(want, rel=1e-12, abs=0)


def test_optfs_refusals() -> None:
    constant = torch.ones(10, 5)
    with pytest.raises(UserError, match=r"optfs: the ID fit features give no usable bins .*Fix:"):
        calibrate(Net(), "optfs", [constant])
    with pytest.raises(UserError, match=r"optfs: the ID fit features give no usable bins"):
        optfs_theta((0.0, 0.0))
    with pytest.raises(UserError, match=r"optfs weighs each penultimate feature .*not 'fc'\. Fix: set placement"):
        calibrate(Net(), "optfs", [constant], placement="fc")
    headless = nn.Sequential(nn.Linear(5, 2))
    headless.get_classifier = lambda: headless  # a classifier without a (K, D) weight
    reads = []
    with pytest.raises(UserError, match=r"optfs weighs each penultimate feature by a linear classifier's .*Fix:"):
        calibrate(headless, "optfs", lambda: reads.append(1) or [constant])
    assert not reads  # refused before any pass
    with pytest.raises(ValueError, match=r"Invalid shaping spec 'optfs@1': optfs takes 0 parameter"):
        get_shaping("optfs@1")


def test_optfs_is_listed_with_its_formula_paper_and_reference() -> None:
    entry = {e.name: e for e in list_shapings()}["optfs"]
    assert entry.form == "optfs"
    for part in ("Zhao et al.", "ICLR 2024", "θ_k", "Qinyu-Allen-Zhao/OptFSOOD detector/ours.py"):
        assert part in entry.description
