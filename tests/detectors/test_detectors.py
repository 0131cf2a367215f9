"""Detectors on hand-made features/logits against numpy transcriptions of the papers' formulas and of OpenOOD
v1.5's post-processors (where they differ, the relation is asserted); gradient detectors against autograd and
transcriptions of the authors' code with a tiny model."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ash_lightning.detectors import (
    DETECTORS,
    FDBD,
    KNN,
    MDS,
    ODIN,
    RMDS,
    AdaScale,
    FeaturesAndLogits,
    FittedDetector,
    GradNorm,
    NNGuide,
    ViM,
    gradnorm,
    load_fitted,
    odin,
    parse_detector,
)
from ash_lightning.detectors.adascale import adaptive_percentiles
from ash_lightning.detectors.knn import top_inner_products
from ash_lightning.errors import UserError
from tests.detectors.conftest import D, K, N


def _fit_and_score(spec: str, data: dict[str, torch.Tensor]) -> np.ndarray:
    fitted = parse_detector(spec).fit(data["features"], data["logits"], data["labels"], data["weight"], data["bias"])
    return fitted.score(data["test"], data["test_logits"]).numpy()


def _np(data: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in data.items()}


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))[:, 0]


def _openood_normalizer(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10


# --- mds / rmds -------------------------------------------------------------------------------------------------


def _class_precision(feats: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenOOD mds/rmds setup: class means, EmpiricalCovariance(assume_centered=False) of the class-centred data,
    precision = pinvh."""
    means = np.stack([feats[labels == c].mean(0) for c in range(K)])
    centered = np.concatenate([feats[labels == c] - means[c] for c in range(K)])
    covariance = np.cov(centered.T, bias=True)
    return means, np.linalg.pinv(covariance, hermitian=True)


def _openood_class_scores(feats: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    return np.stack([-np.diag((feats - means[c]) @ precision @ (feats - means[c]).T) for c in range(K)], 1)


def test_mds_matches_openood_and_lee(fit_data):
    d = _np(fit_data)
    means, precision = _class_precision(d["features"], d["labels"])
    expected = _openood_class_scores(d["test"], means, precision).max(1)  # Lee et al.'s M(x) = max_c -MD_c
    np.testing.assert_allclose(_fit_and_score("mds", fit_data), expected, rtol=1e-9, atol=1e-9)


def test_mds_pseudo_inverse_on_a_dead_unit(fit_data):
    data = dict(fit_data)
    data["features"] = fit_data["features"].clone().index_fill_(1, torch.tensor([3]), 0.0)
    d = _np(data)
    means, precision = _class_precision(d["features"], d["labels"])
    expected = _openood_class_scores(d["test"], means, precision).max(1)
    np.testing.assert_allclose(_fit_and_score("mds", data), expected, rtol=1e-9, atol=1e-9)


def test_rmds_matches_openood_and_ren(fit_data):
    d = _np(fit_data)
    means, precision = _class_precision(d["features"], d["labels"])
    whole_mean = d["features"].mean(0)
    whole_precision = np.linalg.pinv(np.cov((d["features"] - whole_mean).T, bias=True), hermitian=True)
    background = -np.diag((d["test"] - whole_mean) @ whole_precision @ (d["test"] - whole_mean).T)
    expected = (_openood_class_scores(d["test"], means, precision) - background[:, None]).max(1)
    np.testing.assert_allclose(_fit_and_score("rmds", fit_data), expected, rtol=1e-9, atol=1e-9)


def test_mds_float32_statistics_agree_with_float64(fit_data):
    fitted = MDS().fit(fit_data["features"], fit_data["logits"], fit_data["labels"])
    exact = fitted.score(fit_data["test"], fit_data["test_logits"])
    single = fitted.to(dtype=torch.float32).score(fit_data["test"].float(), fit_data["test_logits"].float())
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), exact, rtol=1e-4, atol=1e-4)


# --- knn / nnguide ----------------------------------------------------------------------------------------------


def test_knn_matches_openood_up_to_the_square(fit_data):
    d = _np(fit_data)
    bank, queries = _openood_normalizer(d["features"]), _openood_normalizer(d["test"])
    squared = ((queries[:, None, :] - bank[None]) ** 2).sum(-1)  # faiss IndexFlatL2 reports squared distances
    openood = -np.sort(squared, axis=1)[:, 7 - 1]
    ours = _fit_and_score("knn@7", fit_data)
    np.testing.assert_allclose(-(ours**2), openood, rtol=1e-7, atol=1e-8)
    np.testing.assert_array_equal(np.argsort(ours), np.argsort(openood))


def test_knn_fraction_keeps_a_seeded_subset(fit_data):
    features, logits = fit_data["features"], fit_data["logits"]
    fitted = KNN(3, 0.25).fit(features, logits)
    bank = fitted.stats["bank"]
    assert bank.shape == (round(0.25 * N), D)
    normalized = F.normalize(features, dim=1)
    rows = torch.cdist(bank, normalized).argmin(1)
    torch.testing.assert_close(normalized[rows], bank)  # every bank row is a fit row
    torch.testing.assert_close(KNN(3, 0.25).fit(features, logits).stats["bank"], bank)  # same seed, same bank
    assert not torch.equal(KNN(3, 0.25, seed=1).fit(features, logits).stats["bank"], bank)
    on_subset = KNN(3).fit(features[rows], logits[rows]).score(fit_data["test"], fit_data["test_logits"])
    torch.testing.assert_close(fitted.score(fit_data["test"], fit_data["test_logits"]), on_subset)


def test_top_inner_products_is_independent_of_the_chunk_size():
    g = torch.Generator().manual_seed(1)
    queries, bank = torch.randn(9, 4, generator=g), torch.randn(50, 4, generator=g)
    full_values, full_indices = (queries @ bank.T).topk(6, dim=1)
    for chunk in (1, 5, 7, 50, 1000):
        values, indices = top_inner_products(queries, bank, 6, chunk)
        torch.testing.assert_close(values, full_values)
        torch.testing.assert_close(indices, full_indices)


def test_nnguide_matches_openood(fit_data):
    d = _np(fit_data)
    guide = _openood_normalizer(d["features"]) * _logsumexp(d["logits"])[:, None]
    inner = _openood_normalizer(d["test"]) @ guide.T  # faiss IndexFlatIP
    expected = -np.sort(-inner, axis=1)[:, :10].mean(1) * _logsumexp(d["test_logits"])
    np.testing.assert_allclose(_fit_and_score("nnguide@10", fit_data), expected, rtol=1e-7, atol=1e-8)


# --- vim / fdbd / gradnorm --------------------------------------------------------------------------------------


def test_vim_matches_openood_and_the_papers_virtual_logit(fit_data):
    d, dim = _np(fit_data), 5
    u = -np.linalg.pinv(d["weight"]) @ d["bias"]
    covariance = (d["features"] - u).T @ (d["features"] - u) / N  # EmpiricalCovariance(assume_centered=True)
    eig_vals, eigen_vectors = np.linalg.eig(covariance)
    null_space = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[dim:]]).T).real
    alpha = d["logits"].max(-1).mean() / np.linalg.norm((d["features"] - u) @ null_space, axis=-1).mean()
    virtual = alpha * np.linalg.norm((d["test"] - u) @ null_space, axis=-1)
    openood = _logsumexp(d["test_logits"]) - virtual
    ours = _fit_and_score(f"vim@{dim}", fit_data)
    np.testing.assert_allclose(ours, openood, rtol=1e-9, atol=1e-9)
    with_virtual = np.concatenate([virtual[:, None], d["test_logits"]], 1)
    paper_ood_probability = np.exp(with_virtual[:, 0] - _logsumexp(with_virtual))
    np.testing.assert_allclose(paper_ood_probability, 1 / (1 + np.exp(ours)), rtol=1e-9)


def test_fdbd_matches_openood_up_to_the_mean(fit_data):
    d = _np(fit_data)
    denominator = np.zeros((K, K))
    for p in range(K):
        norms = np.linalg.norm(d["weight"] - d["weight"][p], axis=1)
        norms[p] = 1
        denominator[p] = norms
    predicted = d["test_logits"].argmax(1)
    gaps = np.abs(d["test_logits"] - d["test_logits"].max(1, keepdims=True))
    openood = (gaps / denominator[predicted]).sum(1) / np.linalg.norm(d["test"] - d["features"].mean(0), axis=1)
    np.testing.assert_allclose(_fit_and_score("fdbd", fit_data) * (K - 1), openood, rtol=1e-9)


def test_gradnorm_closed_form_equals_autograd_and_the_authors_loss(fit_data):
    fc = nn.Linear(D, K).double()
    with torch.no_grad():
        fc.weight.copy_(fit_data["weight"])
        fc.bias.copy_(fit_data["bias"])
    kl_norms, ones_norms = [], []
    for h in fit_data["test"]:
        log_probs = F.log_softmax(fc(h[None]), dim=1)
        for targets, store in (
            (torch.full((1, K), 1.0 / K, dtype=torch.float64), kl_norms),
            (torch.ones(1, K, dtype=torch.float64), ones_norms),
        ):
            fc.zero_grad()
            # KL(u || p) = sum u log u - sum u log p; the authors' code uses targets of ones and no constant
            loss = (targets * (targets.log() - log_probs)).sum() if store is kl_norms else -(targets * log_probs).sum()
            loss.backward(retain_graph=True)
            store.append(fc.weight.grad.abs().sum().item())
    ours = gradnorm(fit_data["test"], fit_data["test_logits"]).numpy()
    np.testing.assert_allclose(ours, kl_norms, rtol=1e-10)
    np.testing.assert_allclose(ours * K, ones_norms, rtol=1e-10)
    fitted = GradNorm().fit(fit_data["features"][:0], fit_data["logits"][:0])
    np.testing.assert_allclose(fitted.score(fit_data["test"], fit_data["test_logits"]).numpy(), ours)


# --- odin / adascale --------------------------------------------------------------------------------------------


class _TinyNet(nn.Module):
    """conv -> relu -> global average pool -> linear, float64, timm-style get_classifier()."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.double().eval()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).relu().mean((2, 3)))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


STD = (63.0 / 255.0, 62.1 / 255.0, 66.7 / 255.0)


def _odin_reference(net: nn.Module, image: torch.Tensor, temper: float, noise: float) -> float:
    """facebookresearch/odin calData.py for one image: CE on outputs / T, sign via ge(grad, 0), the sign divided
    by the channel std, one step of -noise, max softmax of the perturbed outputs / T (numpy)."""
    inputs = image[None].clone().requires_grad_(True)
    outputs = net(inputs)
    label = torch.tensor([int(np.argmax(outputs.detach().numpy()[0]))])
    nn.CrossEntropyLoss()(outputs / temper, label).backward()
    gradient = (torch.ge(inputs.grad, 0).double() - 0.5) * 2
    for channel, std in enumerate(STD):
        gradient[0][channel] = gradient[0][channel] / std
    with torch.no_grad():
        logits = (net(inputs.detach() - noise * gradient) / temper).numpy()[0]
    probs = np.exp(logits - logits.max())
    return float((probs / probs.sum()).max())


def test_odin_matches_the_authors_code(images):
    net = _TinyNet()
    expected = [_odin_reference(net, image, 1000.0, 0.0014) for image in images]
    net.zero_grad(set_to_none=True)
    ours = ODIN(1000.0, 0.0014).score(net, images, STD)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12)
    assert all(p.grad is None for p in net.parameters())  # gradients went to the input only
    # eps = 0 is the tempered MSP of the clean input; the step against the loss gradient raises it
    clean = torch.softmax(net(images) / 1000.0, dim=1).amax(1).detach()
    torch.testing.assert_close(odin(net, images, 1000.0, 0.0, STD), clean, rtol=1e-14, atol=0)
    assert (ours > clean).all()
    with pytest.raises(ValueError, match="std has 2 entries"):
        odin(net, images, 1000.0, 0.0014, STD[:2])


def _adascale_reference(net: nn.Module, fit_images: torch.Tensor, images: torch.Tensor, det: AdaScale) -> np.ndarray:
    """OpenOOD adascale_postprocessor + AdaScaleANet.forward_threshold, transcribed (ECDF as statsmodels')."""

    def features_of(x: torch.Tensor) -> torch.Tensor:
        return net.conv(x).relu().mean((2, 3))

    def pass_(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        data = x.clone().requires_grad_(True)
        feature = features_of(data)
        output = net.fc(feature)
        labels = output.detach().argmax(dim=1)
        net.zero_grad()
        output[torch.arange(len(labels)), labels].backward(torch.ones(len(labels), dtype=output.dtype))
        grad = data.grad.detach()
        b, c, h, w = data.shape
        n_pixels = int(c * h * w * det.o)
        _, idx = torch.topk(grad.abs().view(b, -1), n_pixels, dim=1, largest=False)
        mask = torch.zeros_like(grad.view(b, -1)).scatter_(1, idx, 1).view(b, c, h, w)
        with torch.no_grad():
            perturbed = features_of(data.detach() + grad.sign() * mask * 0.5)
        return feature.detach(), perturbed, (feature.detach() - perturbed).abs()

    def q_prime(feature, perturbed, shift) -> np.ndarray:
        k1_, k2_ = max(1, int(D_TINY * det.k1 / 100)), max(1, int(D_TINY * det.k2 / 100))
        c_o = torch.gather(perturbed.relu(), 1, torch.topk(feature, k=k1_, dim=1)[1]).sum(1)
        q = torch.gather(shift, 1, torch.topk(feature, k=k2_, dim=1)[1]).sum(1)
        return (c_o + det.lmbda * q).numpy()

    fit_q = np.sort(q_prime(*pass_(fit_images)))
    feature, perturbed, shift = pass_(images)
    ecdf = np.searchsorted(fit_q, q_prime(feature, perturbed, shift), side="right") / len(fit_q)
    percentiles = det.p_min + (1 - ecdf) * (det.p_max - det.p_min)
    x = feature.relu().numpy()
    ks = D_TINY - np.round(D_TINY * percentiles / 100.0).astype(int)
    top_sums = np.array([np.sort(row)[::-1][:k].sum() for row, k in zip(x, ks, strict=True)])
    scaled = feature.numpy() * np.exp(x.sum(1) / top_sums)[:, None]
    return _logsumexp(scaled @ net.fc.weight.detach().numpy().T + net.fc.bias.detach().numpy())


D_TINY = 8


def test_adascale_matches_openood(images):
    net = _TinyNet()
    fit_images = torch.randn(20, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    det = AdaScale(60.0, 90.0, 30.0, 20.0, 10.0, 0.1)
    expected = _adascale_reference(net, fit_images, images, det)
    forward = FeaturesAndLogits(net)
    fitted = det.fit(torch.cat([det.fit_shifts(forward, batch) for batch in fit_images.split(7)]))
    ours = fitted.score(forward, images, net.fc.weight.detach(), net.fc.bias.detach())
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12)


def test_adaptive_percentiles_follow_the_fit_cdf():
    fit_shifts = torch.arange(1.0, 11.0)  # ECDF(q) = (number of fit values <= q) / 10
    p = adaptive_percentiles(torch.tensor([0.0, 1.0, 5.5, 10.0, 99.0]), fit_shifts, 70.0, 90.0)
    torch.testing.assert_close(p, torch.tensor([90.0, 88.0, 80.0, 70.0, 70.0]))


def test_gradient_detectors_refuse_inference_mode_and_accept_inference_tensors(images):
    net = _TinyNet()
    with torch.inference_mode():
        frozen = images.clone()
        with pytest.raises(UserError, match=r"odin needs gradients .* Trainer\(inference_mode=False\)"):
            odin(net, frozen, 1000.0, 0.0014, STD)
    torch.testing.assert_close(odin(net, frozen, 1000.0, 0.0014, STD), odin(net, images, 1000.0, 0.0014, STD))


def test_features_and_logits_reads_the_classifier_input(images):
    net = _TinyNet()
    features, logits = FeaturesAndLogits(net)(images)
    torch.testing.assert_close(features, net.conv(images).relu().mean((2, 3)))
    torch.testing.assert_close(logits, net(images))
    assert not net.fc._forward_pre_hooks  # the capture hook is gone


# --- spec strings, requirements, errors, cache ------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("mds", MDS()),
        ("rmds", RMDS()),
        ("knn@50", KNN(50)),
        ("knn@50@0.1", KNN(50, 0.1)),
        ("vim@64", ViM(64)),
        ("fdbd", FDBD()),
        ("nnguide@10", NNGuide(10)),
        ("odin@1000@0.0014", ODIN(1000.0, 0.0014)),
        ("odin@10", ODIN(10.0)),
        ("gradnorm", GradNorm()),
        ("adascale", AdaScale()),
        ("adascale@80@85@5@1@10@0.05", AdaScale(80.0, 85.0)),
    ],
)
def test_specs_parse_and_round_trip(spec, expected):
    detector = parse_detector(spec)
    assert detector == expected
    assert parse_detector(detector.spec) == detector


@pytest.mark.parametrize(
    "spec, cause",
    [
        ("knn", "takes 1 to 2 parameter"),
        ("knn@0", "K .* >= 1"),
        ("knn@5@0", r"fraction .* \(0, 1\]"),
        ("vim@1.5", "<D> must be an integer"),
        ("vim", "takes 1 parameter"),
        ("mds@3", "takes 0 parameter"),
        ("odin@0", "temperature"),
        ("adascale@90@80", "p_min <= p_max"),
        ("maha", "unknown detector name 'maha'"),
    ],
)
def test_bad_specs_name_the_cause_and_the_valid_forms(spec, cause):
    with pytest.raises(ValueError, match=cause) as err:
        parse_detector(spec)
    assert isinstance(err.value, UserError)
    assert "knn@K[@fraction]" in str(err.value) and "odin[@T[@eps]]" in str(err.value)


def test_each_detector_says_what_it_needs():
    needs = {name: (cls.needs_labels, cls.needs_fit, cls.needs_gradients) for name, cls in DETECTORS.items()}
    assert {name for name, (labels, _, _) in needs.items() if labels} == {"mds", "rmds", "she", "mdspp"}
    assert {name for name, (_, fit, _) in needs.items() if not fit} == {"gradnorm", "odin"}
    assert {name for name, (_, _, grad) in needs.items() if grad} == {"odin", "adascale"}


def test_fit_errors_name_the_cause(fit_data):
    features, logits = fit_data["features"], fit_data["logits"]
    with pytest.raises(UserError, match="needs the class labels"):
        MDS().fit(features, logits)
    with pytest.raises(UserError, match=r"class indices in \[0, 5\)"):
        RMDS().fit(features, logits, fit_data["labels"] + 1)
    with pytest.raises(UserError, match="D = 12 must be smaller than the feature dimension 12"):
        ViM(12).fit(features, logits, weight=fit_data["weight"], bias=fit_data["bias"])
    with pytest.raises(UserError, match="needs the classifier's weight"):
        FDBD().fit(features, logits)
    with pytest.raises(UserError, match="bank holds 24 of the 240 fit samples, fewer than K = 30"):
        KNN(30, 0.1).fit(features, logits)


def test_vim_without_residual_outside_the_subspace_names_a_smaller_d(fit_data):
    """Features spanning 4 of 12 dimensions around the origin -pinv(W) b leave no residual outside a 6-dimensional
    subspace (alpha would be ~1e15): the fit refuses D = 6 and names a D below the rank; D = 3 fits."""
    weight, bias = fit_data["weight"], fit_data["bias"]
    origin = -torch.linalg.pinv(weight) @ bias
    g = torch.Generator().manual_seed(1)
    features = origin + torch.randn(N, 4, generator=g, dtype=torch.float64) @ torch.randn(
        4, D, generator=g, dtype=torch.float64
    )
    logits = features @ weight.T + bias
    with pytest.raises(
        UserError,
        match=r"vim@6: .*no residual.*span only 4 dimensions.*Fix: choose D below the features' rank, e\.g\. vim@2",
    ):
        ViM(6).fit(features, logits, weight=weight, bias=bias)
    fitted = ViM(3).fit(features, logits, weight=weight, bias=bias)
    alpha = float(fitted.stats["alpha"])
    assert np.isfinite(alpha) and alpha < 1e6


@pytest.mark.parametrize("spec", ["mds", "rmds", "knn@7@0.5", "vim@5", "fdbd", "nnguide@10"])
def test_fitted_state_survives_a_save_and_load(spec, fit_data):
    fitted = parse_detector(spec).fit(
        fit_data["features"], fit_data["logits"], fit_data["labels"], fit_data["weight"], fit_data["bias"]
    )
    buffer = io.BytesIO()
    torch.save(fitted.state_dict(), buffer)
    buffer.seek(0)
    restored = load_fitted(torch.load(buffer, weights_only=True))
    assert isinstance(restored, FittedDetector) and restored.spec == fitted.spec
    torch.testing.assert_close(
        restored.score(fit_data["test"], fit_data["test_logits"]),
        fitted.score(fit_data["test"], fit_data["test_logits"]),
    )


def test_half_precision_features_score_in_float32(fit_data):
    fitted = KNN(5).fit(fit_data["features"].half(), fit_data["logits"].half())
    score = fitted.score(fit_data["test"].half(), fit_data["test_logits"].half())
    assert score.dtype == torch.float32 and torch.isfinite(score).all()


def test_cost_benchmark_runs_end_to_end(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
    detector_cost = pytest.importorskip("detector_cost")
    monkeypatch.setattr(sys, "argv", ["detector_cost.py", "--batch-size", "8", "--bank", "500", "--rounds", "1"])
    threads = torch.get_num_threads()
    try:
        detector_cost.main()
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = ("| mds |", "| knn@50@0.1 |", "| vim@32 |", "| gradnorm |", "| odin@1000@0.0014 |", "| adascale |")
    for row in (*rows, "| neco |", "| mdspp |", "| cadref |"):
        assert row in out
