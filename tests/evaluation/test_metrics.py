"""ood_metrics / OODMetrics / summarize / unique_by_index against scikit-learn, OpenOOD's metric code and by hand."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve
from torch.utils.data import DistributedSampler
from torchmetrics.functional.classification import binary_auroc

from ash_lightning.evaluation.metrics import (
    OODMetrics,
    fpr_key,
    ood_metrics,
    summarize,
    threshold_at_tpr,
    unique_by_index,
)

TOL = 1e-9
CONVENTIONS = ("paper", "openood")


def paper_reference(id_scores, ood_scores, tpr: float) -> dict[str, float]:
    """The four "paper" metrics from scikit-learn (ID positive, average precision) on the values upcast to float64."""
    id64 = np.asarray(id_scores, dtype=np.float64)
    ood64 = np.asarray(ood_scores, dtype=np.float64)
    scores = np.concatenate((id64, ood64))
    is_id = np.concatenate((np.ones(id64.size), np.zeros(ood64.size)))
    fprs, tprs, _ = roc_curve(is_id, scores, drop_intermediate=False)
    return {
        fpr_key(tpr): float(fprs[np.argmax(tprs >= tpr)]),
        "auroc": float(roc_auc_score(is_id, scores)),
        "aupr_in": float(average_precision_score(is_id, scores)),
        "aupr_out": float(average_precision_score(1 - is_id, -scores)),
    }


def openood_reference(id_scores, ood_scores, tpr: float) -> dict[str, float]:
    """Transcription of OpenOOD v1.5's ``compute_all_metrics`` -> ``auc_and_fpr_recall``
    (Jingkang50/OpenOOD, openood/evaluators/metrics.py): conf = score, label -1 for OOD."""
    conf = np.concatenate((np.asarray(id_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)))
    label = np.concatenate((np.zeros(len(id_scores)), np.full(len(ood_scores), -1)))
    ood_indicator = np.zeros_like(label)
    ood_indicator[label == -1] = 1
    fpr_list, tpr_list, _ = roc_curve(ood_indicator, -conf)
    fpr = fpr_list[np.argmax(tpr_list >= tpr)]
    precision_in, recall_in, _ = precision_recall_curve(1 - ood_indicator, conf)
    precision_out, recall_out, _ = precision_recall_curve(ood_indicator, -conf)
    return {
        fpr_key(tpr): float(fpr),
        "auroc": float(auc(fpr_list, tpr_list)),
        "aupr_in": float(auc(recall_in, precision_in)),
        "aupr_out": float(auc(recall_out, precision_out)),
    }


def reference(id_scores, ood_scores, tpr: float, convention: str) -> dict[str, float]:
    if convention == "paper":
        return paper_reference(id_scores, ood_scores, tpr)
    return openood_reference(id_scores, ood_scores, tpr)


def assert_metrics_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert isinstance(got[key], float)
        assert 0.0 <= got[key] <= 1.0
        assert got[key] == pytest.approx(want[key], abs=TOL, rel=0), key


def make_case(
    rng: np.random.Generator, kind: str, n_id: int, n_ood: int, offset: float
) -> tuple[np.ndarray, np.ndarray]:
    if kind == "ties":  # integers in a small range: most scores tied
        return (rng.integers(0, 6, n_id) + offset).astype(np.float64), (rng.integers(0, 5, n_ood) + offset).astype(
            np.float64
        )
    return rng.normal(offset + 1.0, 2.0, n_id), rng.normal(offset, 2.0, n_ood)


SIZES = [(1, 1), (1, 40), (40, 1), (20, 400), (400, 20), (300, 300)]


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("offset", [0.0, 25.0, -1000.0])
@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_matches_reference(convention: str, offset: float, kind: str, dtype: type) -> None:
    rng = np.random.default_rng([ord(c) for c in f"{convention}{offset}{kind}{np.dtype(dtype).name}"])
    for n_id, n_ood in SIZES:
        for _ in range(3):
            id_scores, ood_scores = (s.astype(dtype) for s in make_case(rng, kind, n_id, n_ood, offset))
            want = reference(id_scores, ood_scores, 0.95, convention)
            assert_metrics_close(ood_metrics(id_scores, ood_scores, convention=convention), want)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("tpr", [0.5, 0.9, 0.995, 1.0])
def test_other_tpr(convention: str, tpr: float) -> None:
    rng = np.random.default_rng(1)
    for kind in ("normal", "ties"):
        id_scores, ood_scores = make_case(rng, kind, 200, 300, 0.0)
        got = ood_metrics(id_scores, ood_scores, tpr=tpr, convention=convention)
        assert_metrics_close(got, reference(id_scores, ood_scores, tpr, convention))


def test_openood_trapezoid_and_dropped_thresholds() -> None:
    """Where OpenOOD's curves differ from the paper's definitions, "openood" follows OpenOOD."""
    # Every threshold holds one ID and one OOD score: roc_curve keeps only the end points, so FPR@95 is 1, not
    # 19/20, and the PR curve is a line at P = 1/2 from (0, 1): trapezoid area 0.5 + 0.5/40, average precision 0.5.
    scores = np.arange(20.0)
    got = ood_metrics(scores, scores, convention="openood")
    assert got == pytest.approx({"fpr95": 1.0, "auroc": 0.5, "aupr_in": 0.5125, "aupr_out": 0.5125}, abs=TOL)
    assert ood_metrics(scores, scores)["aupr_in"] == pytest.approx(0.5, abs=TOL)
    assert_metrics_close(got, openood_reference(scores, scores, 0.95))
    # Tied, unbalanced, offset: 7 ID and 300 OOD scores on 4 values around -1000.
    rng = np.random.default_rng(14)
    id_scores, ood_scores = rng.integers(0, 4, 7) - 1000.0, rng.integers(0, 4, 300) - 1000.0
    assert_metrics_close(
        ood_metrics(id_scores, ood_scores, convention="openood"), openood_reference(id_scores, ood_scores, 0.95)
    )


def test_keys_follow_tpr() -> None:
    assert fpr_key(0.95) == "fpr95"
    assert fpr_key(0.90) == "fpr90"
    assert fpr_key(0.995) == "fpr99.5"
    assert fpr_key(1.0) == "fpr100"
    assert list(ood_metrics([1.0], [0.0], tpr=0.9)) == ["fpr90", "auroc", "aupr_in", "aupr_out"]


def test_conventions_differ_by_definition() -> None:
    id_scores = np.arange(20.0)  # 0..19
    ood_scores = np.r_[np.full(19, -10.0), 50.0]
    # paper: t = 1 keeps 19/20 ID >= t; OOD >= 1 is only the 50 -> 1/20.
    assert ood_metrics(id_scores, ood_scores, convention="paper")["fpr95"] == 1 / 20
    # openood: t = -10 has 19/20 OOD <= t; no ID score is <= -10 -> 0.
    assert ood_metrics(id_scores, ood_scores, convention="openood")["fpr95"] == 0.0


def test_hand_computed_values() -> None:
    # ID {2, 1}, OOD {1, 0}: pairs (2>1, 2>0, 1=1, 1>0) -> AUROC = 3.5 / 4.
    got = ood_metrics([2.0, 1.0], [1.0, 0.0])
    assert got["auroc"] == 0.875
    # ID positive, descending thresholds 2 (P=1, R=.5), 1 (P=2/3, R=1): AP = .5 + .5 * 2/3.
    assert got["aupr_in"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # 95% of ID needs t = 1; OOD >= 1 is 1 of 2.
    assert got["fpr95"] == 0.5
    assert ood_metrics([5.0], [5.0]) == {"fpr95": 1.0, "auroc": 0.5, "aupr_in": 0.5, "aupr_out": 0.5}
    assert ood_metrics([6.0], [5.0]) == {"fpr95": 0.0, "auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_and_list_inputs(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    id_scores = (torch.randn(300, generator=generator) * 4 + 20).to(dtype)
    ood_scores = (torch.randn(500, generator=generator) * 4 + 17).to(dtype)
    want = paper_reference(id_scores.double().numpy(), ood_scores.double().numpy(), 0.95)
    assert_metrics_close(ood_metrics(id_scores, ood_scores), want)
    assert_metrics_close(ood_metrics(id_scores.double().tolist(), ood_scores.double().tolist()), want)


def test_torchmetrics_binary_auroc_sigmoid_trap() -> None:
    """binary_auroc applies a sigmoid to scores outside [0, 1]; in float32 sigmoid(x) == 1 for x >~ 17,
    so energy-like scores collapse to one tie. ood_metrics uses the raw scores and matches sklearn."""
    generator = torch.Generator().manual_seed(0)
    id_scores = torch.randn(500, generator=generator) * 3 + 30
    ood_scores = torch.randn(500, generator=generator) * 3 + 26
    scores = torch.cat((id_scores, ood_scores))
    labels = torch.cat((torch.ones(500), torch.zeros(500))).long()
    ours = ood_metrics(id_scores, ood_scores)["auroc"]
    assert ours == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=TOL)
    assert ours > 0.8
    assert binary_auroc(scores, labels).item() == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("set_name", ["ID", "OOD"])
def test_non_finite_scores_raise(bad: float, set_name: str) -> None:
    clean = np.linspace(0.0, 1.0, 10)
    dirty = clean.copy()
    dirty[[2, 5, 7]] = bad
    args = (dirty, clean) if set_name == "ID" else (clean, dirty)
    with pytest.raises(ValueError, match=rf"^{set_name} scores contain 3 non-finite"):
        ood_metrics(*args)


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="^ID scores are empty"):
        ood_metrics([], [1.0])
    with pytest.raises(ValueError, match="^OOD scores are empty"):
        ood_metrics(torch.ones(3), torch.ones(0))
    with pytest.raises(ValueError, match="1-D"):
        ood_metrics(np.ones((2, 2)), [1.0])
    with pytest.raises(
        ValueError, match="^convention: 'OpenOOD' is not a valid choice; valid: one of 'paper', 'openood'"
    ):
        ood_metrics([1.0], [0.0], convention="OpenOOD")
    for tpr in (0.0, -0.5, 1.5, 95):
        with pytest.raises(ValueError, match=r"^tpr: .* is out of range; valid: a number in \(0, 1\]"):
            ood_metrics([1.0], [0.0], tpr=tpr)


# --------------------------------------------------------------------------- unique_by_index


def test_unique_by_index_keeps_first_in_index_order() -> None:
    index = torch.tensor([3, 1, 3, 0, 1, 2])
    values = torch.tensor([30.0, 10.0, -1.0, 0.0, -1.0, 20.0])
    flags = torch.tensor([True, False, False, True, True, False])
    got_index, got_values, got_flags = unique_by_index(index, values, flags)
    assert got_index.tolist() == [0, 1, 2, 3]
    assert got_values.tolist() == [0.0, 10.0, 20.0, 30.0]
    assert got_flags.tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="integer"):
        unique_by_index(index.float(), values)
    with pytest.raises(ValueError, match="aligned with index"):
        unique_by_index(index, values[:3])


# --------------------------------------------------------------------------- OODMetrics


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric OODMetrics was called before")
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_oodmetrics_batches_equal_concatenation(convention: str) -> None:
    generator = torch.Generator().manual_seed(0)
    id_scores = torch.randn(257, generator=generator) + 21
    ood_scores = torch.randn(130, generator=generator) + 20
    metric = OODMetrics(tpr=0.9, convention=convention)
    for chunk in id_scores[:200].split(64):  # whole-batch flag
        metric.update(chunk, True)
    metric.update(ood_scores[:70].half(), False)  # any float dtype
    mixed = torch.cat((id_scores[200:], ood_scores[70:]))  # per-sample flags
    metric.update(mixed, torch.arange(mixed.numel()) < 57)
    want = ood_metrics(
        id_scores, torch.cat((ood_scores[:70].half().float(), ood_scores[70:])), tpr=0.9, convention=convention
    )
    assert metric.compute() == want
    metric.reset()
    with pytest.raises(ValueError, match="no scores"):
        metric.compute()


def _sharded(n: int, world: int, rank: int) -> list[int]:
    return list(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False))


def test_oodmetrics_deduplicates_distributed_padding() -> None:
    """Two "ranks" get DistributedSampler shards (padded with repeats); merged, each sample counts once."""
    generator = torch.Generator().manual_seed(0)
    id_all = torch.randn(11, generator=generator) + 1  # 11 and 7 are not divisible by 3 ranks -> padding
    ood_all = torch.randn(7, generator=generator)
    world = 3
    ranks = [OODMetrics() for _ in range(world)]
    for rank, metric in enumerate(ranks):
        for values, is_id in ((id_all, True), (ood_all, False)):
            index = torch.tensor(_sharded(values.numel(), world, rank))
            metric.update(values[index], is_id, index=index)
    merged = ranks[0]
    for other in ranks[1:]:
        merged.merge_state(other)  # the same "cat" reduction DDP sync applies
    assert sum(t.numel() for t in merged.scores) == 12 + 9  # the padding repeats really are there
    assert merged.compute() == ood_metrics(id_all, ood_all)

    # without the index the repeats would be counted and change the result
    plain = OODMetrics()
    for rank in range(world):
        for values, is_id in ((id_all, True), (ood_all, False)):
            plain.update(values[torch.tensor(_sharded(values.numel(), world, rank))], is_id)
    assert plain.compute() != ood_metrics(id_all, ood_all)


def test_oodmetrics_same_index_in_id_and_ood_kept() -> None:
    metric = OODMetrics()
    metric.update(torch.tensor([2.0, 3.0, 3.0]), True, index=torch.tensor([0, 1, 1]))
    metric.update(torch.tensor([1.0, 2.5]), False, index=torch.tensor([0, 1]))
    assert metric.compute() == ood_metrics([2.0, 3.0], [1.0, 2.5])


def test_oodmetrics_errors() -> None:
    metric = OODMetrics()
    metric.update(torch.tensor([1.0, float("nan")]), True)
    metric.update(torch.tensor([0.0, float("inf"), float("nan")]), False)
    with pytest.raises(ValueError, match="^ID scores contain 1 non-finite"):
        metric.compute()
    metric = OODMetrics()
    metric.update(torch.tensor([1.0]), True)
    metric.update(torch.tensor([0.0, float("inf"), float("nan")]), False)
    with pytest.raises(ValueError, match="^OOD scores contain 2 non-finite"):
        metric.compute()
    metric = OODMetrics()
    metric.update(torch.tensor([1.0, 2.0]), True)
    with pytest.raises(ValueError, match="^OOD scores are empty"):
        metric.compute()
    with pytest.raises(ValueError, match="every batch or for none"):
        metric.update(torch.tensor([0.0]), False, index=torch.tensor([0]))
    with pytest.raises(ValueError, match="is_id has shape"):
        metric.update(torch.tensor([0.0, 1.0]), torch.tensor([True]))
    with pytest.raises(ValueError, match="1-D"):
        metric.update(torch.zeros(2, 2, 2), True)
    with pytest.raises(ValueError, match="convention"):
        OODMetrics(convention="nope")
    assert OODMetrics.full_state_update is False
    assert pickle.loads(pickle.dumps(OODMetrics(tpr=0.9))).tpr == 0.9


# --------------------------------------------------------------------------- summarize


def test_summarize_mean_and_groups() -> None:
    per_set = {
        "ssb_hard": {"fpr95": 0.8, "auroc": 0.7, "aupr_in": 0.6, "aupr_out": 0.5},
        "ninco": {"fpr95": 0.6, "auroc": 0.8, "aupr_in": 0.7, "aupr_out": 0.6},
        "inaturalist": {"fpr95": 0.1, "auroc": 0.99, "aupr_in": 0.98, "aupr_out": 0.97},
    }
    summary = summarize(per_set, {"near": ["ssb_hard", "ninco"], "far": ["inaturalist"]})
    assert summary["mean"] == pytest.approx(
        {"fpr95": 0.5, "auroc": 2.49 / 3, "aupr_in": 2.28 / 3, "aupr_out": 2.07 / 3}
    )
    assert summary["groups"]["near"] == pytest.approx({"fpr95": 0.7, "auroc": 0.75, "aupr_in": 0.65, "aupr_out": 0.55})
    assert summary["groups"]["far"] == per_set["inaturalist"]
    assert summarize(per_set)["groups"] == {}
    with pytest.raises(
        ValueError,
        match=r"Unknown OOD set\(s\) \['openimage_o', 'textures'\].*known sets: \['inaturalist', 'ninco', 'ssb_hard'\]",
    ):
        summarize(per_set, {"far": ["inaturalist", "textures", "openimage_o"]})
    with pytest.raises(ValueError, match="no member sets"):
        summarize(per_set, {"near": []})
    with pytest.raises(ValueError, match="empty"):
        summarize({})
    with pytest.raises(ValueError, match="metric keys"):
        summarize({"a": {"fpr95": 0.1}, "b": {"fpr90": 0.1}})


def test_oodmetrics_samples_are_the_rows_of_every_rank_each_once() -> None:
    """Per-sample columns (scores (B, R), targets, preds, finite) survive accumulation and DistributedSampler
    padding, each (is_id, index) once in index order, as the callback saves them to scores.npz."""
    generator = torch.Generator().manual_seed(1)
    n, world = 10, 3  # 10 samples on 3 ranks: 12 slots, two padded repeats
    scores = torch.randn(n, 2, generator=generator)
    scores[4, 1] = float("nan")
    targets, preds = torch.arange(n) % 3, (torch.arange(n) + 1) % 3
    ranks = [OODMetrics() for _ in range(world)]
    for rank, metric in enumerate(ranks):
        index = torch.tensor(_sharded(n, world, rank))
        metric.update(scores[index], True, index=index, targets=targets[index], preds=preds[index])
    merged = ranks[0]
    for other in ranks[1:]:
        merged.merge_state(other)
    assert sum(len(t) for t in merged.index) == 12
    rows = merged.samples()
    assert set(rows) == {"scores", "is_id", "finite", "index", "targets", "preds"}
    assert torch.equal(rows["index"], torch.arange(n))
    torch.testing.assert_close(rows["scores"], scores.double(), equal_nan=True)
    assert torch.equal(rows["targets"], targets) and torch.equal(rows["preds"], preds) and bool(rows["is_id"].all())
    assert rows["finite"].tolist() == [i != 4 for i in range(n)]
    with pytest.raises(ValueError, match="one score column"):
        merged.compute()


def test_oodmetrics_samples_empty_and_optional_columns_all_or_none() -> None:
    metric = OODMetrics()
    assert metric.samples() == {}
    metric.update(torch.tensor([[1.0], [2.0]]), False, finite=torch.tensor([True, False]))
    assert metric.samples()["finite"].tolist() == [True, False]
    with pytest.raises(ValueError, match="`targets` to OODMetrics.update for every batch or for none"):
        metric.update(torch.tensor([[0.0]]), False, targets=torch.tensor([1]))
    with pytest.raises(ValueError, match="preds has 1 rows but scores have 2"):
        OODMetrics().update(torch.zeros(2), True, preds=torch.zeros(1))
    metric.update(torch.tensor([[3.0]]), True)
    assert metric.compute() == ood_metrics([3.0], [1.0, 2.0])  # a single column is fine


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("tpr", [0.95, 0.9, 0.5, 1.0, 0.01, 0.7])
def test_threshold_at_tpr_is_the_paper_fpr_operating_point(kind: str, tpr: float) -> None:
    """The threshold is an ID score keeping >= tpr of ID scores, the next larger ID score keeps fewer, and the
    paper FPR is exactly the fraction of OOD scores >= it (random and heavily tied cases, many sizes)."""
    rng = np.random.default_rng(7)
    for n_id, n_ood in [*SIZES, (20, 20), (3, 7), (100, 57)]:
        for offset in (0.0, 20.0, -1000.0):
            id_scores, ood_scores = make_case(rng, kind, n_id, n_ood, offset)
            t = threshold_at_tpr(id_scores, tpr)
            assert t in id_scores
            assert np.mean(id_scores >= t) >= tpr
            above = id_scores[id_scores > t]
            assert not above.size or np.mean(id_scores >= above.min()) < tpr
            assert ood_metrics(id_scores, ood_scores, tpr=tpr)[fpr_key(tpr)] == np.mean(ood_scores >= t)


def test_threshold_at_tpr_by_hand_and_errors() -> None:
    assert threshold_at_tpr([4.0, 3.0, 2.0, 1.0], tpr=0.75) == 2.0
    assert threshold_at_tpr([4.0, 3.0, 2.0, 1.0], tpr=0.76) == 1.0
    assert threshold_at_tpr([1.0, 1.0, 1.0, 5.0], tpr=0.5) == 1.0  # ties: 5 alone keeps 1/4
    assert threshold_at_tpr(torch.tensor([2.0, 9.0]), tpr=0.5) == 9.0
    with pytest.raises(ValueError, match="non-finite"):
        threshold_at_tpr([1.0, float("nan")])
    with pytest.raises(Exception, match="tpr"):
        threshold_at_tpr([1.0], tpr=0.0)
