"""The newer post-hoc detectors (she, klm, residual, nci, neco, mdspp, cadref, caref) on hand-made features and
logits against transcriptions of their authors' code (OpenOOD v1.5 post-processors, litianliu/NCI-OOD,
mueller-mp/maha-norm, LingAndZero/CADRef), in numpy/scipy/sklearn/torch as the reference files compute them."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from ash_lightning.detectors import SHE, parse_detector
from ash_lightning.errors import UserError
from tests.detectors.conftest import D, K, N
from tests.detectors.test_detectors import _fit_and_score, _np

TOL = {"rtol": 1e-6, "atol": 1e-6}


# --- she --------------------------------------------------------------------------------------------------------


def _openood_she(features, logits, labels, test, test_logits) -> torch.Tensor:
    """OpenOOD she_postprocessor: setup (per-class mean of the correctly classified training features) and
    postprocess with metric inner_product."""
    all_preds = logits.argmax(1)
    activation_log = []
    for i in range(K):
        mask = torch.logical_and(labels == i, all_preds == i)
        activation_log.append(features[mask].mean(0, keepdim=True))
    activation_log = torch.cat(activation_log)
    pred = test_logits.argmax(1)
    return torch.sum(torch.mul(test, activation_log[pred]), dim=1)


def test_she_matches_openood(fit_data):
    labels = fit_data["logits"].argmax(1)  # every class has correctly classified samples
    labels[::3] = fit_data["labels"][::3]
    data = {**fit_data, "labels": labels}
    expected = _openood_she(data["features"], data["logits"], labels, data["test"], data["test_logits"])
    assert torch.isfinite(expected).all()
    np.testing.assert_allclose(_fit_and_score("she", data), expected.numpy(), **TOL)


def test_she_class_without_correct_fit_samples_scores_zero_where_openood_gives_nan(fit_data):
    labels = fit_data["logits"].argmax(1)
    predicted_class = int(fit_data["test_logits"].argmax(1)[0])
    labels[labels == predicted_class] = (predicted_class + 1) % K  # no correct fit sample of that class
    data = {**fit_data, "labels": labels}
    expected = _openood_she(data["features"], data["logits"], labels, data["test"], data["test_logits"])
    with pytest.warns(UserWarning, match=rf"she: 1 of {K} classes have no correctly classified fit sample"):
        ours = _fit_and_score("she", data)
    nan = torch.isnan(expected).numpy()
    assert nan[0] and not nan.all()
    np.testing.assert_allclose(ours[~nan], expected.numpy()[~nan], **TOL)
    assert (ours[nan] == 0).all()


def test_she_needs_labels(fit_data):
    with pytest.raises(UserError, match="she: needs the class labels"):
        SHE().fit(fit_data["features"], fit_data["logits"])


# --- klm --------------------------------------------------------------------------------------------------------


def _openood_klm(logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """OpenOOD kl_matching_postprocessor: setup (mean softmax per predicted class, one-hot without samples) and
    postprocess (-min over the templates of scipy.stats.entropy, by sklearn's pairwise_distances_argmin_min)."""
    import scipy.stats
    from sklearn.metrics import pairwise_distances_argmin_min

    all_softmax = torch.softmax(torch.from_numpy(logits), 1)
    preds = torch.from_numpy(logits).argmax(1)
    mean_softmax_val = []
    for i in range(K):
        if torch.sum(preds.eq(i).float()) == 0:
            temp = np.zeros((K,))
            temp[i] = 1
            mean_softmax_val.append(temp)
        else:
            mean_softmax_val.append(all_softmax[preds.eq(i)].mean(0).numpy())
    softmax = torch.softmax(torch.from_numpy(test_logits), 1).numpy()
    return -pairwise_distances_argmin_min(
        softmax, np.array(mean_softmax_val), metric=lambda p, q: scipy.stats.entropy(p, q)
    )[1]


def test_klm_matches_openood(fit_data):
    d = _np(fit_data)
    np.testing.assert_allclose(_fit_and_score("klm", fit_data), _openood_klm(d["logits"], d["test_logits"]), **TOL)


def test_klm_class_never_predicted_gets_the_one_hot_template(fit_data):
    logits = fit_data["logits"].clone()
    logits[:, 2] -= 100.0  # no fit sample predicted as class 2
    test_logits = fit_data["test_logits"].clone()
    test_logits[0] = torch.tensor([0.0, 0.0, 60.0, 0.0, 0.0], dtype=torch.float64)  # nearly one-hot on class 2
    data = {**fit_data, "logits": logits, "test_logits": test_logits}
    fitted = parse_detector("klm").fit(data["features"], logits)
    torch.testing.assert_close(fitted.stats["templates"][2], torch.eye(K, dtype=torch.float64)[2])
    expected = _openood_klm(logits.numpy(), test_logits.numpy())
    np.testing.assert_allclose(fitted.score(data["test"], test_logits).numpy(), expected, **TOL)
    # softmax of float32 logits underflows to exact zeros: KL to the one-hot template is finite, 0 log 0 = 0
    single = fitted.to(dtype=torch.float32).score(data["test"].float(), (test_logits * 3).float())
    assert torch.isfinite(single).all()


# --- residual ---------------------------------------------------------------------------------------------------


def _openood_residual(d: dict[str, np.ndarray], dim: int) -> np.ndarray:
    """OpenOOD residual_postprocessor: setup (u, EmpiricalCovariance(assume_centered=True), eig, null space) and
    postprocess."""
    from sklearn.covariance import EmpiricalCovariance

    u = -np.matmul(np.linalg.pinv(d["weight"]), d["bias"])
    ec = EmpiricalCovariance(assume_centered=True)
    ec.fit(d["features"] - u)
    eig_vals, eigen_vectors = np.linalg.eig(ec.covariance_)
    ns = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[dim:]]).T)
    return -np.linalg.norm(np.matmul(d["test"] - u, ns), axis=-1)


@pytest.mark.parametrize("dim", [1, 5, 11])
def test_residual_matches_openood(fit_data, dim):
    expected = _openood_residual(_np(fit_data), dim)
    np.testing.assert_allclose(_fit_and_score(f"residual@{dim}", fit_data), expected, **TOL)


def test_residual_refuses_d_at_the_feature_dimension_and_above_the_rank(fit_data):
    weight, bias = fit_data["weight"], fit_data["bias"]
    with pytest.raises(UserError, match=rf"residual@{D}: D = {D} must be smaller than the feature dimension {D}"):
        parse_detector(f"residual@{D}").fit(fit_data["features"], fit_data["logits"], weight=weight, bias=bias)
    origin = -torch.linalg.pinv(weight) @ bias
    g = torch.Generator().manual_seed(1)
    flat = origin + torch.randn(N, 4, generator=g, dtype=torch.float64) @ torch.randn(
        4, D, generator=g, dtype=torch.float64
    )
    with pytest.raises(UserError, match=r"residual@6: .*span only 4 dimensions.*e\.g\. residual@2"):
        parse_detector("residual@6").fit(flat, flat @ weight.T + bias, weight=weight, bias=bias)


@pytest.mark.parametrize("spec", ["residual@64", "vim@100"])
def test_d_not_below_the_feature_dimension_is_refused_before_any_backbone_pass(spec):
    from ash_lightning.module import OODEvalModule

    with pytest.raises(UserError, match=rf"model.score: {spec}: D = \d+ must be smaller than the feature dimension 64"):
        OODEvalModule("cifar_resnet20", score=["energy", spec])


# --- nci --------------------------------------------------------------------------------------------------------


def _openood_nci(d: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """OpenOOD / litianliu/NCI-OOD nci_postprocessor: setup (training mean, fc weight) and postprocess."""
    train_mean = torch.from_numpy(np.mean(d["features"].numpy(), axis=0))
    w = d["weight"]
    feature, output = d["test"], d["test_logits"]
    values, nn_idx = output.max(1)
    return torch.sum(w[nn_idx] * (feature - train_mean), axis=1) / torch.norm(
        feature - train_mean, dim=1
    ) + alpha * torch.norm(feature, p=1, dim=1)


@pytest.mark.parametrize("spec, alpha", [("nci", 0.0001), ("nci@0.1", 0.1), ("nci@0", 0.0)])
def test_nci_matches_the_authors_code(fit_data, spec, alpha):
    np.testing.assert_allclose(_fit_and_score(spec, fit_data), _openood_nci(fit_data, alpha).numpy(), **TOL)


# --- neco -------------------------------------------------------------------------------------------------------


def _authors_neco(d: dict[str, np.ndarray], neco_dim: int | None = None) -> np.ndarray:
    """mueller-mp/maha-norm NINCO/detection_methods.py evaluate_neco (use_logit=True), without its pickle cache;
    ``neco_dim`` None is its 90%-variance rule."""
    from numpy import linalg as LA
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    ss = StandardScaler()
    complete_vectors_train = ss.fit_transform(d["features"])
    complete_vectors_test = ss.transform(d["test"])
    pca_estimator = PCA()
    pca_estimator.fit(complete_vectors_train)
    cumulative_variance = np.cumsum(pca_estimator.explained_variance_ratio_)
    if neco_dim is None:
        neco_dim = np.where(cumulative_variance >= 0.90)[0][0] + 1
    cls_test_reduced_all = pca_estimator.transform(complete_vectors_test)
    score_id_maxlogit = d["test_logits"].max(axis=-1)
    cls_test_reduced = cls_test_reduced_all[:, :neco_dim]
    l_id = []
    for i in range(cls_test_reduced.shape[0]):
        sc_complet = LA.norm(complete_vectors_test[i, :])
        sc = LA.norm(cls_test_reduced[i, :])
        l_id.append(sc / sc_complet)
    return np.array(l_id) * score_id_maxlogit


@pytest.mark.parametrize("spec, dim", [("neco", None), ("neco@1", 1), ("neco@7", 7)])
def test_neco_matches_the_authors_code(fit_data, spec, dim):
    d = _np(fit_data)
    np.testing.assert_allclose(_fit_and_score(spec, fit_data), _authors_neco(d, dim), **TOL)


def test_neco_with_a_dead_unit_and_the_automatic_dimension(fit_data):
    data = {**fit_data, "features": fit_data["features"].clone().index_fill_(1, torch.tensor([3]), 0.0)}
    fitted = parse_detector("neco").fit(data["features"], data["logits"])
    auto_dim = fitted.stats["components"].shape[1]
    assert 1 < auto_dim < D
    np.testing.assert_allclose(fitted.score(data["test"], data["test_logits"]).numpy(), _authors_neco(_np(data)), **TOL)


# --- mdspp ------------------------------------------------------------------------------------------------------


def _authors_mahalanobis_norm(d: dict[str, np.ndarray]) -> np.ndarray:
    """mueller-mp/maha-norm NINCO/detection_methods.py evaluate_Mahalanobis_norm (K classes instead of 1000, no
    file cache, on the CPU)."""
    from sklearn.covariance import EmpiricalCovariance

    feature_ood = d["test"] / np.linalg.norm(d["test"], axis=-1, keepdims=True)
    feature_id_train = d["features"] / np.linalg.norm(d["features"], axis=-1, keepdims=True)
    train_means = []
    train_feat_centered = []
    for i in range(K):
        fs = feature_id_train[d["labels"] == i]
        _m = fs.mean(axis=0)
        train_means.append(_m)
        train_feat_centered.extend(fs - _m)
    ec = EmpiricalCovariance(assume_centered=True)
    ec.fit(np.array(train_feat_centered).astype(np.float64))
    mean = torch.from_numpy(np.array(train_means)).double()
    prec = torch.from_numpy(ec.precision_).double()
    return -np.array(
        [(((f - mean) @ prec) * (f - mean)).sum(axis=-1).min().cpu().item() for f in torch.from_numpy(feature_ood)]
    )


def test_mdspp_matches_the_authors_code(fit_data):
    expected = _authors_mahalanobis_norm(_np(fit_data))
    np.testing.assert_allclose(_fit_and_score("mdspp", fit_data), expected, **TOL)
    scaled = {**fit_data, "test": fit_data["test"] * torch.linspace(0.1, 10, len(fit_data["test"]))[:, None]}
    np.testing.assert_allclose(_fit_and_score("mdspp", scaled), expected, **TOL)  # blind to the feature norm


def test_mdspp_needs_labels(fit_data):
    with pytest.raises(UserError, match="mdspp: needs the class labels"):
        parse_detector("mdspp").fit(fit_data["features"], fit_data["logits"])


# --- cadref / caref --------------------------------------------------------------------------------------------


def _authors_class_means(features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """LingAndZero/CADRef utils/get_stat.py get_features (features grouped by predicted class) and the
    get_mean_feature of CARef.py / CADRef.py."""
    grouped = [[] for _ in range(K)]
    p_labels = logits.argmax(1)
    for i in range(features.size(0)):
        grouped[p_labels[i]].append(features[i])
    return torch.stack([torch.stack(grouped[i], dim=0).mean(dim=0) for i in range(K)])


def _authors_caref(d: dict[str, torch.Tensor]) -> np.ndarray:
    """CARef.eval for one batch."""
    train_mean = _authors_class_means(d["features"], d["logits"])
    logit, feature = d["test_logits"], d["test"]
    class_ids = torch.argmax(torch.softmax(logit, dim=1), dim=1).cpu().numpy()
    tm = train_mean[class_ids]
    score = (tm - feature).norm(dim=1, p=1) / feature.norm(dim=1, p=1)
    return -score.cpu().numpy()


def _authors_cadref(d: dict[str, torch.Tensor]) -> np.ndarray:
    """CADRef.get_state (logit_method Energy) and CADRef.eval for one batch."""
    train_mean = _authors_class_means(d["features"], d["logits"])
    grouped = [d["logits"][d["logits"].argmax(1) == i] for i in range(K)]
    global_mean_logit_score = torch.mean(torch.cat([torch.logsumexp(g, dim=1) for g in grouped]), dim=0)
    w = d["weight"]
    logit, feature = d["test_logits"], d["test"]
    class_ids = torch.argmax(torch.softmax(logit, dim=1), dim=1).cpu().numpy()
    tm = train_mean[class_ids]
    dist = feature - tm
    sg = w[class_ids].sign()
    ep_dist = dist * sg
    ep_dist[ep_dist < 0] = 0
    ep_error = ep_dist.norm(dim=1, p=1) / feature.norm(dim=1, p=1)
    en_dist = dist * (-sg)
    en_dist[en_dist < 0] = 0
    en_error = en_dist.norm(dim=1, p=1) / feature.norm(dim=1, p=1)
    logit_score = torch.logsumexp(logit, dim=1)
    score = ep_error / logit_score + en_error / global_mean_logit_score
    return -score.cpu().numpy()


@pytest.mark.parametrize("spec, reference", [("caref", _authors_caref), ("cadref", _authors_cadref)])
def test_cadref_and_caref_match_the_authors_code(fit_data, spec, reference):
    assert len(fit_data["logits"].argmax(1).unique()) == K  # the authors' code needs every class predicted
    data = {**fit_data, "labels": torch.zeros_like(fit_data["labels"])}  # labels are not read
    np.testing.assert_allclose(_fit_and_score(spec, data), reference(fit_data), **TOL)


def test_caref_class_never_predicted_gets_a_zero_mean(fit_data):
    logits = fit_data["logits"].clone()
    logits[:, 1] -= 1000.0
    with pytest.warns(UserWarning, match=rf"caref: no fit sample is predicted as 1 of {K} classes \(classes 1\)"):
        fitted = parse_detector("caref").fit(fit_data["features"], logits)
    assert (fitted.stats["means"][1] == 0).all()
    test_logits = torch.zeros(1, K, dtype=torch.float64).index_fill_(1, torch.tensor([1]), 1.0)
    torch.testing.assert_close(
        fitted.score(fit_data["test"][:1], test_logits), torch.tensor([-1.0], dtype=torch.float64)
    )


# --- spec strings -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, normalised",
    [
        ("she", "she"),
        ("klm", "klm"),
        ("residual@8", "residual@8"),
        ("nci", "nci"),
        ("nci@0.0001", "nci"),
        ("nci@0.01", "nci@0.01"),
    ],
)
def test_specs_parse_and_round_trip(spec, normalised):
    detector = parse_detector(spec)
    assert detector.spec == normalised and parse_detector(normalised) == detector


@pytest.mark.parametrize(
    "spec, cause",
    [
        ("she@1", "takes 0 parameter"),
        ("residual", "takes 1 parameter"),
        ("residual@0", "D .* >= 1"),
        ("nci@-1", "alpha .* >= 0"),
    ],
)
def test_bad_specs_name_the_cause(spec, cause):
    with pytest.raises(UserError, match=cause):
        parse_detector(spec)


@pytest.mark.parametrize("name", ["she", "klm", "residual", "nci", "neco", "mdspp", "cadref", "caref"])
def test_list_describes_the_formula_paper_and_reference_file(name):
    from ash_lightning.detectors.spec import list_detectors

    (entry,) = [e for e in list_detectors() if e.name == name]
    assert re.search(r"\b20\d\d\)?:", entry.description)  # the paper's venue and year, then the formula
    assert re.search(r"\(.*\.py[ )]", entry.description)  # the reference file
