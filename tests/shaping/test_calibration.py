"""ash_lightning.shaping.calibration: ReAct at an ID percentile, DICE, VRA and LTS; the calibration pass and its
cache."""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import timm
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import ash_lightning.models  # noqa: F401  (registers cifar_resnet20)
from ash_lightning.callbacks import ActivationShapingCallback
from ash_lightning.data.fit_pass import FitPass
from ash_lightning.errors import UserError
from ash_lightning.shaping import calibration
from ash_lightning.shaping.calibration import (
    LogitShaper,
    calibrate_shapers,
    collect_stats,
    dice_logits,
    dice_mask,
    lts,
    lts_factor,
    needs_calibration,
    vra,
)
from ash_lightning.shaping.hooks import attach_shaping
from ash_lightning.shaping.specs import get_shaping, list_shapings
from ash_lightning.shaping.sweep import shaped_logits

KEY = {"backbone": "net", "checkpoint": None, "fit": "fit.npz"}
# DICE by hand: mean_ID(h) = [2, 2, 2, 2, 3], contributions W * mean = [[2, -2, 4, 0, 3], [1, 6, -4, 2, -3]]
W = torch.tensor([[1.0, -1.0, 2.0, 0.0, 1.0], [0.5, 3.0, -2.0, 1.0, -1.0]])
B = torch.tensor([0.5, -0.5])
H_FIT = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 2.0, 1.0, 0.0, 1.0]])


class Net(nn.Module):
    """A timm-like model whose penultimate features are its input: logits = fc(x)."""

    def __init__(self, weight: Tensor = W, bias: Tensor = B) -> None:
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x: Tensor) -> Tensor:
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class Fit:
    """A loader_factory over ``x`` (batches of 3, as ``(images, targets, index)``) counting its calls."""

    def __init__(self, x: Tensor, index: Tensor | None = None) -> None:
        self.x, self.calls = x, 0
        self.index = torch.arange(len(x)) if index is None else index

    def __call__(self) -> DataLoader:
        self.calls += 1
        return DataLoader(TensorDataset(self.x, torch.zeros(len(self.x)), self.index), batch_size=3)


def no_fit_data() -> DataLoader:
    raise AssertionError("the fit data was read despite a cached entry")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASH_CACHE_DIR", str(tmp_path / "cache"))
    with torch.no_grad():
        yield tmp_path / "cache"


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("cifar_resnet20").eval()


@pytest.fixture(scope="module")
def images() -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"fit": torch.rand(5, 3, 16, 16, generator=generator), "test": torch.rand(2, 3, 16, 16, generator=generator)}


def percentile(x: Tensor, q: float) -> float:
    """The q-th percentile of all values of ``x`` (linear interpolation in float64)."""
    return float(np.percentile(x.double().numpy(), q))


def fit(spec: str, x: Tensor, model: nn.Module | None = None, placement: str = "penultimate"):
    """``spec`` fitted on ``x`` (cached under a key naming the data)."""
    key = {**KEY, "fit": hashlib.sha256(x.numpy().tobytes()).hexdigest()}
    return calibrate_shapers([get_shaping(spec)], model or Net(), placement, FitPass(Fit(x), key))[0]


def test_react_percentile_threshold():
    shaper = fit("react@p90", torch.arange(1.0, 11.0).view(2, 5))
    assert shaper.spec == "react@p90" and shaper.percentile == 90 and not needs_calibration(shaper)
    assert shaper.params == pytest.approx((9.1,))  # 1 + 0.9 * (10 - 1), linear interpolation
    x = torch.rand(11, 5)
    threshold = percentile(x, 90)
    shaper = fit("react@p90", x)
    assert shaper.params == (threshold,)
    assert torch.equal(shaper(x), x.clamp(max=threshold))


def react_threshold_reference(activations: np.ndarray, q: float) -> float:
    """Transcription of deeplearning-wisc/react compute_threshold.py (and OpenOOD's react_postprocessor.py):
    ``np.percentile(activation_log.flatten(), q)`` over every fit activation."""
    return float(np.percentile(activations.flatten(), q))


def test_collect_stats_options_and_subsample(monkeypatch):
    x = torch.rand(11, 5)
    index = torch.arange(11)
    index[[2, 7]] = -1  # corrupt files the data module skipped
    request = calibration.StatsRequest(frozenset({50.0}), mean=True)
    stats = collect_stats(Net(), "penultimate", request, FitPass(Fit(x, index), max_samples=6))
    kept = x[[0, 1, 3, 4, 5, 6]]
    assert stats.n_samples == 6 and stats.percentiles == {50.0: percentile(kept, 50)}
    torch.testing.assert_close(stats.mean, kept.double().mean(0))
    monkeypatch.setattr(calibration, "MAX_VALUES", 55)  # 11 samples x 5 units: still exact
    stats = collect_stats(Net(), "penultimate", calibration.StatsRequest(frozenset({90.0})), FitPass(Fit(x)))
    # The authors interpolate float32 activations in float32, we in float64: equal up to float32 rounding.
    assert stats.percentiles[90.0] == pytest.approx(react_threshold_reference(x.numpy(), 90), rel=1e-6, abs=0)


def test_subsample_keeps_whole_random_samples():
    x = torch.arange(60.0).view(20, 3)  # sample i holds 3i, 3i + 1, 3i + 2
    exact = calibration._Subsample(cap=60)
    for chunk in x.split([7, 6, 7]):
        exact.add(chunk)
    assert torch.equal(exact.values().sort().values, x.flatten())
    picks = []
    for seed in (0, 0, 1):
        subsample = calibration._Subsample(cap=20, seed=seed)  # 6 samples of 3 values
        for chunk in x.split([7, 6, 7]):
            subsample.add(chunk)
        rows = subsample.values().view(-1, 3)
        assert rows.shape == (6, 3) and torch.equal(rows[:, 1:] - rows[:, :1], torch.tensor([[1.0, 2.0]]).expand(6, 2))
        picks.append(sorted(int(first) // 3 for first in rows[:, 0]))
        assert len(set(picks[-1])) == 6
    assert picks[0] == picks[1] != picks[2]  # seeded: the same data gives the same subset


def test_react_percentile_above_the_cap_sees_every_unit(monkeypatch):
    """512 units, odd units 4x the scale of even ones, 3x the cap: within 0.5% of the exact percentile."""
    generator = torch.Generator().manual_seed(14)
    scale = torch.where(torch.arange(512) % 2 == 1, 4.0, 1.0)
    x = torch.randn(6000, 512, generator=generator).relu() * scale
    monkeypatch.setattr(calibration, "MAX_VALUES", 2000 * 512)
    loader = DataLoader(TensorDataset(x), batch_size=250)
    request = calibration.StatsRequest(frozenset({90.0, 10.0, 99.0}))
    stats = collect_stats(Net(torch.ones(2, 512), torch.zeros(2)), "penultimate", request, FitPass(lambda: loader))
    for q in (90.0, 99.0):
        exact = react_threshold_reference(x.numpy(), q)
        assert abs(stats.percentiles[q] / exact - 1) < 0.005, (q, stats.percentiles[q], exact)
    assert stats.percentiles[10.0] == 0.0 == react_threshold_reference(x.numpy(), 10)


def test_statistics_are_of_the_activations_as_the_placement_gave_them():
    """A network that changes the placement's output in place later (an in-place ReLU after it): the percentile
    and RAS's sorted profile are those of the output as it was, negatives included."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = torch.randn(12, 5)
    with torch.no_grad():
        before = net[0](x)
    assert (before < 0).any()
    for spec in ("react@p10", "ras"):
        shaper = calibrate_shapers([get_shaping(spec)], net, "0", FitPass(Fit(x)))[0]
        if spec == "ras":
            torch.testing.assert_close(shaper.fn.keywords["mean_curve"], before.sort(1).values.mean(0))
        else:
            assert shaper.params == (percentile(before, 10),)


def test_dice_mask_and_logits_by_hand():
    mean = H_FIT.mean(0)
    assert torch.equal(mean, torch.tensor([2.0, 2.0, 2.0, 2.0, 3.0]))
    top_10 = torch.zeros(2, 5, dtype=torch.bool)
    top_10[1, 1] = True  # 6: the single top-10% contribution of 10
    assert torch.equal(dice_mask(W, mean, 90), top_10)
    top_30 = top_10.clone()
    top_30[0, 2] = top_30[0, 4] = True  # 6, 4, 3
    assert torch.equal(dice_mask(W, mean, 70), top_30)
    ones = torch.ones(1, 5)
    assert torch.equal(dice_logits(ones, W, B, top_30), torch.tensor([[2 + 1 + 0.5, 3 - 0.5]]))
    for spec, mask, logits in (("dice@90", top_10, [[0.5, 2.5]]), ("dice@70", top_30, [[3.5, 2.5]])):
        shaper = fit(spec, H_FIT)
        assert isinstance(shaper, LogitShaper) and (shaper.spec, shaper.params) == (spec, (float(spec[5:]),))
        assert torch.equal(shaper.fn.mask, mask)
        net = Net()
        with attach_shaping(net, shaper):
            assert torch.equal(net(ones), torch.tensor(logits))
        assert torch.equal(net(ones), ones @ W.T + B)


def test_vra_by_hand_and_calibrated():
    x = torch.tensor([[-1.0, 0.5, 1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(vra(x, 1.0, 3.0), torch.tensor([[0.0, 0.0, 1.0, 2.0, 3.0, 3.0]]))
    acts = torch.rand(9, 5)
    shaper = fit("vra@10@90", acts)
    alpha, beta = percentile(acts, 10), percentile(acts, 90)
    assert shaper.spec == "vra@10@90" and shaper.params == (alpha, beta)
    assert torch.equal(shaper(acts), vra(acts, alpha, beta))


def test_lts_by_hand():
    features = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    # k = 4 - round(2) = 2 -> (10 / 7)^2; all zeros -> 1. At 90: k = max(1, 4 - 4) = 1 -> (10 / 4)^2
    torch.testing.assert_close(lts_factor(features, 50), torch.tensor([(10 / 7) ** 2, 1.0]))
    torch.testing.assert_close(lts_factor(features, 90), torch.tensor([6.25, 1.0]))
    logits = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    before = features.clone(), logits.clone()
    shaper = get_shaping("lts@90")
    assert isinstance(shaper, LogitShaper) and not needs_calibration(shaper)
    shaped = shaper(features, logits, nn.Identity())
    torch.testing.assert_close(shaped, torch.tensor([[6.25, -12.5], [3.0, 4.0]]))
    torch.testing.assert_close(shaped, lts(features, logits, 90))
    assert torch.equal(features, before[0]) and torch.equal(logits, before[1])  # nothing modified in place


def dice_mask_reference(weight: np.ndarray, mean: np.ndarray, p: float) -> np.ndarray:
    """Transcription of deeplearning-wisc/dice models/route.py ``RouteDICE.calculate_mask_weight`` (and OpenOOD's
    dice_postprocessor.py ``calculate_mask``): keep contributions strictly above their p-th percentile."""
    contrib = mean[None, :] * weight
    return contrib > np.percentile(contrib, p)


def lts_factor_reference(x: np.ndarray, percentile: float) -> np.ndarray:
    """Transcription of andrijazz/lts lts.py ``lts``: ReLU, then (s1 / s2)² with s2 the sum of the top k."""
    x = np.maximum(x, 0)
    n = x.shape[1]
    k = n - int(np.round(n * percentile / 100.0))
    s2 = np.sort(x, axis=1)[:, n - k :].sum(1)
    return (x.sum(1) / s2) ** 2


def test_dice_with_silent_units_matches_the_authors():
    """20 of 64 units silent on ID data: their zero contributions straddle the 60th percentile, so only the
    positive contributions are kept (top-k by count would also keep zeros, i.e. weights of silent units)."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(10, 64, generator=generator)
    fit_features = torch.rand(50, 64, generator=generator) + 0.1
    fit_features[:, :20] = 0
    net = Net(weight, torch.zeros(10))
    shaper = fit("dice@60", fit_features, net)
    want = dice_mask_reference(weight.numpy(), fit_features.double().mean(0).numpy(), 60)
    assert torch.equal(shaper.fn.mask, torch.from_numpy(want))
    assert want.sum() == (weight[:, 20:] > 0).sum() < 640 - round(640 * 0.6)
    test_features = torch.rand(4, 64, generator=generator)  # the silent units fire on these
    with attach_shaping(net, shaper):
        logits = net(test_features)
    reference = test_features.double() @ (weight.double() * torch.from_numpy(want)).T
    torch.testing.assert_close(torch.logsumexp(logits.double(), 1), torch.logsumexp(reference, 1))


@pytest.mark.parametrize("p", [86.0, 90.0, 33.3, 0.0])
def test_dice_mask_where_n_p_is_not_whole_matches_the_authors(p):
    # W * mean from the hand case above: sorted -4 -3 -2 0 1 2 2 3 4 6; at p = 86, 10 * 0.86 = 8.6 is not whole,
    # the percentile is 3 + 0.74 * (4 - 3) and 4 and 6 are kept (a count of 10 - round(8.6) = 1 would keep 6 only).
    mean = H_FIT.double().mean(0)
    want = dice_mask_reference(W.numpy(), mean.numpy(), p)
    assert torch.equal(dice_mask(W, mean, p), torch.from_numpy(want))
    if p == 86.0:
        assert want.sum() == 2
    generator = torch.Generator().manual_seed(int(p * 10))
    weight, mean = torch.randn(7, 11, generator=generator), torch.rand(11, generator=generator, dtype=torch.float64)
    want = dice_mask_reference(weight.numpy(), mean.numpy(), p)
    assert torch.equal(dice_mask(weight, mean, p), torch.from_numpy(want))


def test_lts_with_negative_features_matches_the_authors():
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(16, 64, generator=generator)  # e.g. ViT tokens: half negative
    logits = torch.randn(16, 10, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ReLU first: no "non-negative activations" warning
        for percentile in (65.0, 90.0, 95.0):
            want = torch.from_numpy(lts_factor_reference(features.numpy(), percentile))
            torch.testing.assert_close(lts_factor(features, percentile), want, rtol=1e-5, atol=0)
            torch.testing.assert_close(lts(features, logits, percentile), logits * want[:, None], rtol=1e-5, atol=0)
            assert not torch.allclose(lts_factor(features, percentile), lts_factor(features.relu() - 1, percentile))


def test_cache_skips_the_fit_data(cache):
    first = Fit(torch.rand(8, 5))
    specs = [get_shaping(s) for s in ("react@p90", "dice@90", "none")]
    fitted = calibrate_shapers(specs, Net(), "penultimate", FitPass(first, KEY))
    assert first.calls == 1 and fitted[2] is specs[2]
    again = calibrate_shapers(specs, Net(), "penultimate", FitPass(no_fit_data, dict(KEY)))
    assert [s.params for s in again] == [s.params for s in fitted]
    assert torch.equal(again[1].fn.mask, fitted[1].fn.mask)
    assert len(os.listdir(cache)) == 1 and str(next(cache.iterdir())).endswith(".json")  # no temporary files left
    for key, placement in (({**KEY, "fit": "other.npz"}, "penultimate"), (KEY, "fc")):
        other = Fit(torch.rand(8, 5))
        calibrate_shapers(specs, Net(), placement, FitPass(other, key))
        assert other.calls == 1
    more = Fit(first.x)  # a new percentile is collected and merged into the entry
    p95 = calibrate_shapers([get_shaping("react@p95")], Net(), "penultimate", FitPass(more, KEY))[0]
    assert more.calls == 1 and p95.params == (percentile(first.x, 95),)
    calibrate_shapers([get_shaping("react@p95"), *specs], Net(), "penultimate", FitPass(no_fit_data, KEY))
    assert (
        calibrate_shapers(specs[2:], Net(), "penultimate", FitPass(no_fit_data, KEY)) == specs[2:]
    )  # nothing to calibrate


def test_cache_entry_from_before_the_new_statistics_is_completed_not_misread(cache):
    """An entry written before RAS's and OptFS's statistics existed (no such fields) keeps its percentiles and mean;
    the new statistics are collected once and merged in, then read back without the fit data."""
    import json

    x = torch.rand(8, 5)
    first = Fit(x)
    old = calibrate_shapers(
        [get_shaping("react@p90"), get_shaping("dice@90")], Net(), "penultimate", FitPass(first, KEY)
    )
    (path,) = cache.iterdir()
    entry = json.loads(path.read_text())
    for field in ("sorted_mean", "bin_contributions"):
        del entry[field]  # the layout of the entries written before them
    entry["percentiles"] = [[90.0, 123.0]]  # a marker: an entry read (not rebuilt) keeps it
    path.write_text(json.dumps(entry))
    specs = [get_shaping(s) for s in ("react@p90", "dice@90", "optfs", "ras", "bfact@95@2")]
    more = Fit(x)
    fitted = calibrate_shapers(specs, Net(), "penultimate", FitPass(more, KEY))
    assert more.calls == 1 and fitted[0].params == (123.0,)  # only the missing statistics were collected
    assert torch.equal(fitted[1].fn.mask, old[1].fn.mask)
    fresh = calibrate_shapers(specs[2:], Net(), "penultimate", FitPass(Fit(x)))  # no key: nothing cached
    again = calibrate_shapers(specs, Net(), "penultimate", FitPass(no_fit_data, KEY))
    for cached, want in zip(again[2:], fresh, strict=True):
        torch.testing.assert_close(cached(5 * x), want(5 * x))
    assert json.loads(path.read_text())["percentiles"] == [[90.0, 123.0], [95.0, percentile(x, 95)]]


def test_refused_where_a_calibrated_shaper_cannot_work_before_any_pass(resnet, images):
    """optfs at another placement than penultimate: one line from OODEvalModule and from the callback, before the
    fit data is read."""
    from ash_lightning.module import OODEvalModule

    with pytest.raises(UserError, match=r"^model\.placement: optfs weighs each penultimate feature .* not 'pre_pool'"):
        OODEvalModule("cifar_resnet20", shaping=["none", "optfs"], placement="pre_pool")
    callback = ActivationShapingCallback(["ras", "optfs"], placement="layer3")
    fit_data = Fit(images["fit"])
    trainer = SimpleNamespace(datamodule=SimpleNamespace(fit_dataloader=fit_data, hparams={"fit": "fit images"}))
    with pytest.raises(UserError, match=r"optfs weighs .*only works at placement 'penultimate', not 'layer3'"):
        callback.on_test_start(trainer, Wrapper(resnet))
    assert fit_data.calls == 0


def test_corrupt_cache_entry_warns_once_and_is_rebuilt(cache):
    specs = [get_shaping("react@p90")]
    first = Fit(torch.rand(8, 5))
    fitted = calibrate_shapers(specs, Net(), "penultimate", FitPass(first, KEY))
    (entry,) = cache.iterdir()
    entry.write_text(entry.read_text()[:-20])  # truncated
    again = Fit(first.x)
    with pytest.warns(UserWarning, match=r"calibration cache .*\.json is unreadable .*rebuilding it") as seen:
        rebuilt = calibrate_shapers(specs, Net(), "penultimate", FitPass(again, KEY))
    assert len(seen) == 1 and again.calls == 1 and rebuilt[0].params == fitted[0].params
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert calibrate_shapers(specs, Net(), "penultimate", FitPass(no_fit_data, KEY))[0].params == fitted[0].params


def test_uncalibrated_shapers_fail_clearly():
    net = Net()
    for spec in ("react@p90", "vra@10@90", "dice@90", "optfs", "bfact@95@2", "ras"):
        shaper = get_shaping(spec)
        assert needs_calibration(shaper)
        with attach_shaping(net, shaper), pytest.raises(ValueError, match=rf"{spec} needs ID statistics: set data.fit"):
            net(H_FIT)
    for specs in (("react@p90", "dice@90"), ("optfs", "bfact@95@2", "ras")):
        with pytest.raises(UserError, match=rf"{', '.join(specs)} need ID statistics: set data\.fit \(ID fit data"):
            calibrate_shapers([get_shaping(s) for s in specs], net, "penultimate", FitPass(lambda: None, KEY))
    with pytest.raises(UserError, match=r"ID fit data \(data\.fit, or the fit_dataloader given\) has no samples"):
        calibrate_shapers([get_shaping("react@p90")], net, "penultimate", FitPass(Fit(torch.rand(0, 5)), KEY))
    headless = nn.Sequential(nn.Linear(5, 2))
    headless.get_classifier = lambda: headless  # a classifier without a (K, D) weight
    with pytest.raises(ValueError, match=r"dice@90 masks a linear classifier's \(K, D\) weight.*Fix:"):
        calibrate_shapers([get_shaping("dice@90")], headless, "penultimate", FitPass(Fit(H_FIT), KEY))
    with pytest.raises(ValueError, match=r"lts@90 .* only works at placement 'penultimate', not 'pre_pool'"):
        attach_shaping(net, "lts@90", "pre_pool")


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("react@p", "<percentile> must be a number"),
        ("react@p101", r"<percentile>=101 is outside \[0, 100\]"),
        ("react@p90@1", r"react@p<percentile> takes 1 parameter"),
        ("vra@10", "vra takes 2 parameter"),
        ("vra@90@10", "<low_percentile> <= <high_percentile>, got 90 > 10"),
        ("dice@100", r"outside the valid range"),
        ("lts", "lts takes 1 parameter"),
        ("lts@x", "<percentile> must be a number, got 'x'"),
    ],
)
def test_bad_specs(spec, reason):
    with pytest.raises(ValueError, match=rf"Invalid shaping spec '{spec}': .*{reason}.*react@p<percentile>.*dice@"):
        get_shaping(spec)


def test_sweep_equals_each_setting_alone(resnet, images):
    specs = ["none", "react@1", "react@p90", "vra@10@90", "dice@90", "lts@90", "ash_s@90", "optfs", "bfact@95@2", "ras"]
    specs.append("rankfeat")  # split point "stage": one pass to block 3, the last stage re-run
    shapers = calibrate_shapers(
        [get_shaping(s) for s in specs], resnet, "penultimate", FitPass(Fit(images["fit"]), KEY)
    )
    assert [s.spec for s in shapers] == specs and not any(map(needs_calibration, shapers))
    fit_features = resnet.forward_head(resnet.forward_features(images["fit"]), pre_logits=True)
    assert shapers[2].params == (percentile(fit_features, 90),)
    x = images["test"]
    stacked = shaped_logits(resnet, x, shapers, "penultimate")
    for shaper, logits in zip(shapers, stacked, strict=True):
        with attach_shaping(resnet, shaper):
            torch.testing.assert_close(logits, resnet(x))
        assert shaper.spec == "none" or not torch.allclose(logits, stacked[0])
    features, classifier = resnet.forward_head(resnet.forward_features(x), pre_logits=True), resnet.get_classifier()
    mask = dice_mask(classifier.weight, fit_features.double().mean(0), 90)
    torch.testing.assert_close(stacked[4], dice_logits(features, classifier.weight, classifier.bias, mask))
    torch.testing.assert_close(stacked[5], lts(features, classifier(features), 90))
    assert torch.equal(resnet(x), stacked[0])


def test_percentiles_of_other_placements(resnet, images):
    maps = resnet.forward_features(images["fit"])  # layer3's output = global_pool's input
    expected = (percentile(maps, 90),)
    assert fit("react@p90", images["fit"], resnet, "pre_pool").params == expected
    assert fit("react@p90", images["fit"], resnet, "layer3").params == expected
    shaper = fit("react@p90", images["fit"], resnet, "layer3")
    with attach_shaping(resnet, shaper, "layer3"):
        shaped = resnet(images["test"])
    torch.testing.assert_close(
        shaped, resnet.forward_head(resnet.forward_features(images["test"]).clamp(max=expected[0]))
    )


class Wrapper(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


@pytest.mark.parametrize("spec", ["lts@90", "dice@90", "optfs", "bfact@95@2", "ras", "rankfeat"])
def test_activation_shaping_callback(resnet, images, spec):
    wrapper, x = Wrapper(resnet).eval(), images["test"]
    callback = ActivationShapingCallback(spec)
    base = wrapper(x)
    fit_data = Fit(images["fit"])
    trainer = SimpleNamespace(datamodule=SimpleNamespace(fit_dataloader=fit_data, hparams={"fit": "fit images"}))
    callback.on_test_start(trainer, wrapper)
    shaped = wrapper(x)
    callback.on_test_end(trainer, wrapper)
    assert not torch.allclose(shaped, base)
    assert torch.equal(wrapper(x), base)
    # The callback fits calibrated specs on the data module's fit data, as OODEvalModule does, and caches them.
    assert fit_data.calls == needs_calibration(callback.requested[0])
    expected = calibrate_shapers([get_shaping(spec)], resnet, "penultimate", FitPass(Fit(images["fit"]), KEY))[0]
    with attach_shaping(resnet, expected):
        torch.testing.assert_close(shaped, resnet(x))
    callback.on_test_start(trainer, wrapper)
    callback.on_test_end(trainer, wrapper)
    assert fit_data.calls == needs_calibration(callback.requested[0])


def test_activation_shaping_callback_without_fit_data(resnet):
    callback = ActivationShapingCallback("dice@90")
    with pytest.raises(UserError, match="dice@90 needs ID statistics"):
        callback.on_test_start(SimpleNamespace(datamodule=None), Wrapper(resnet))


def test_shapers_pickle_and_hooked_models_copy():
    specs = ["react@p90", "vra@10@90", "dice@90", "lts@90", "optfs", "bfact@95@2", "ras"]
    unfitted = [get_shaping(s) for s in specs]
    fitted = calibrate_shapers(unfitted, Net(), "penultimate", FitPass(Fit(H_FIT), KEY))
    net, x = Net(), 5 * torch.rand(3, 5)
    for before, after in zip(unfitted, fitted, strict=True):
        assert needs_calibration(pickle.loads(pickle.dumps(before))) == (before.spec != "lts@90")
        clone = pickle.loads(pickle.dumps(after))
        assert (type(clone), clone.spec, clone.params) == (type(after), after.spec, after.params)
        with attach_shaping(net, after):
            expected = net(x)
            twin = copy.deepcopy(net)  # what DDP spawn / checkpointing do to a hooked model
        with attach_shaping(net, clone):
            torch.testing.assert_close(net(x), expected)
        torch.testing.assert_close(twin(x), expected)
        assert not torch.allclose(expected, net(x))


def test_main_py_calibrates_once_then_reads_the_cache(tiny_data: dict, tiny_checkpoint, tmp_path, monkeypatch) -> None:
    """End to end: every shaping, the calibrated ones fitted on data.fit, in one sweep; the second run never opens
    the (now deleted) fit data."""
    import json
    import shutil

    from tests.conftest import run_main, tiny_config

    fit = tmp_path / "fit.npz"
    shutil.copy(tiny_data["id"], fit)
    specs = ["none", "ash_p@90", "ash_b@65", "ash_s@90", "ash_rand@65", "react@1.0", "react@p90"]
    specs += ["react_and_ash@1.0@90", "scale@85", "dice@90", "vra@10@90", "lts@90", "optfs", "bfact@95@2", "ras"]
    specs += ["rankfeat"]
    assert {get_shaping(s).name for s in specs} == {entry.name for entry in list_shapings()}
    env = {"ASH_CACHE_DIR": str(tmp_path / "cache")}
    outputs = []
    for attempt in ("first", "second"):
        config = tiny_config(tiny_data, tiny_checkpoint, tmp_path / attempt, shaping=specs)
        config["data"]["fit"] = {"kind": "npz", "path": str(fit)}
        proc = run_main(config, tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(json.loads((tmp_path / attempt / "run" / "v" / "ood_results.json").read_text()))
        fit.unlink(missing_ok=True)  # the second run must not need it
    normalised = [get_shaping(s).spec for s in specs]
    assert [r["shaping"] for r in outputs[0]["runs"]] == normalised
    drawn = normalised.index("ash_rand@65")  # random draws: the same only by chance
    means = [[r["mean"] for i, r in enumerate(output["runs"]) if i != drawn] for output in outputs]
    assert means[0] == means[1]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    # Every setting differs from every other: the calibrated ones really used the statistics.
    assert len({json.dumps(r["mean"]) for r in outputs[0]["runs"]}) == len(specs)
