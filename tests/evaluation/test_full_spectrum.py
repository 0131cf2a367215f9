"""Full-spectrum OOD (csid sets counted as ID) against a transcription of OpenOOD v1.5's evaluator, and the csid
parts of the results: table, CSV rows, logger scalars, TensorBoard session metrics; and ``main.py test`` end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ash_lightning.cli.commands import report
from ash_lightning.evaluation.full_spectrum import full_spectrum_metrics, full_spectrum_scalars
from ash_lightning.evaluation.metrics import ood_metrics
from ash_lightning.evaluation.results import compute_results, format_table, write_results
from ash_lightning.evaluation.score_store import load_scores
from ash_lightning.evaluation.tensorboard import setting_metrics
from tests.conftest import run_main, tiny_config, write_npz

TOL = 1e-6
NEAR, FAR = ["ssb_hard", "ninco"], ["inaturalist", "textures"]


# ---- transcription of Jingkang50/OpenOOD, openood/evaluators/metrics.py (compute_all_metrics and its helpers)
def compute_all_metrics(conf, label, pred):
    recall = 0.95
    auroc, aupr_in, aupr_out, fpr = auc_and_fpr_recall(conf, label, recall)
    accuracy = acc(pred, label)
    return [fpr, auroc, aupr_in, aupr_out, accuracy]


def acc(pred, label):
    ind_pred = pred[label != -1]
    ind_label = label[label != -1]
    num_tp = np.sum(ind_pred == ind_label)
    return num_tp / len(ind_label)


def auc_and_fpr_recall(conf, label, tpr_th):
    ood_indicator = np.zeros_like(label)
    ood_indicator[label == -1] = 1
    fpr_list, tpr_list, _ = skm.roc_curve(ood_indicator, -conf)
    fpr = fpr_list[np.argmax(tpr_list >= tpr_th)]
    precision_in, recall_in, _ = skm.precision_recall_curve(1 - ood_indicator, conf)
    precision_out, recall_out, _ = skm.precision_recall_curve(ood_indicator, -conf)
    auroc = skm.auc(fpr_list, tpr_list)
    aupr_in = skm.auc(recall_in, precision_in)
    aupr_out = skm.auc(recall_out, precision_out)
    return auroc, aupr_in, aupr_out, fpr


# ---- transcription of openood/evaluation_api/evaluator.py: eval_ood(fsood=True), _eval_ood, eval_acc('csid')
def openood_fsood(id_test, csid, ood):
    """``id_test``: [pred, conf, gt]; ``csid``: name -> [pred, conf, gt]; ``ood``: split -> name -> [pred, conf, gt].
    Returns OpenOOD's fsood table as {row: [FPR@95, AUROC, AUPR_IN, AUPR_OUT, ACC]} (percentages)."""
    id_pred, id_conf, id_gt = id_test
    csid_pred = np.concatenate([v[0] for v in csid.values()])
    csid_conf = np.concatenate([v[1] for v in csid.values()])
    csid_gt = np.concatenate([v[2] for v in csid.values()])
    id_pred = np.concatenate((id_pred, csid_pred))
    id_conf = np.concatenate((id_conf, csid_conf))
    id_gt = np.concatenate((id_gt, csid_gt))
    table = {}
    for split in ("near", "far"):
        metrics_list = []
        for ood_pred, ood_conf, ood_gt in ood[split].values():
            ood_gt = -1 * np.ones_like(ood_gt)
            pred = np.concatenate([id_pred, ood_pred])
            conf = np.concatenate([id_conf, ood_conf])
            label = np.concatenate([id_gt, ood_gt])
            metrics_list.append(compute_all_metrics(conf, label, pred))
        metrics_list = np.array(metrics_list)
        metrics_mean = np.mean(metrics_list, axis=0, keepdims=True)
        rows = np.concatenate([metrics_list, metrics_mean], axis=0) * 100
        table.update(zip([*ood[split], f"{split}ood"], rows, strict=True))
    correct, total = 0, 0
    for pred, _, gt in csid.values():
        correct += (pred == gt).sum().item()
        total += len(gt)
    correct += (id_test[0] == id_test[2]).sum().item()
    total += len(id_test[2])
    csid_acc = correct / total * 100
    for row in table.values():
        row[-1] = csid_acc
    return table


def _set(rng: np.random.Generator, n: int, shift: float, labelled: bool = True) -> dict[str, np.ndarray]:
    """Two score columns rounded to 0.5 (many ties within and across sets), labels and predictions in 0..3."""
    scores = np.round(2 * rng.normal(shift, 1.0, size=(n, 2))) / 2
    targets = rng.integers(0, 4, n) if labelled else np.full(n, -1)
    preds = np.where(rng.random((n, 2)) < 0.7, targets[:, None], rng.integers(0, 4, (n, 2)))
    return {"scores": scores, "index": np.arange(n), "targets": targets, "preds": preds}


@pytest.fixture
def case() -> tuple[dict, list, list]:
    rng = np.random.default_rng(0)
    store = {"imagenet": _set(rng, 40, 1.5), "imagenet_v2": _set(rng, 23, 1.0), "imagenet_c": _set(rng, 17, 0.2)}
    store |= {"ssb_hard": _set(rng, 21, 0.5, False), "ninco": _set(rng, 13, 0.8, False)}
    store |= {"inaturalist": _set(rng, 19, -0.5, False), "textures": _set(rng, 11, 0.0, False)}
    loaders = [{"name": "imagenet", "role": "id"}]
    loaders += [{"name": n, "role": "ood"} for n in NEAR + FAR]
    loaders += [{"name": n, "role": "csid"} for n in ("imagenet_v2", "imagenet_c")]
    runs = [{"shaping": "none", "score": "energy"}, {"shaping": "ash_s@90", "score": "energy"}]
    return store, loaders, runs


def test_fsood_equals_openoods_evaluator(case: tuple[dict, list, list]) -> None:
    store, loaders, runs = case
    results = compute_results(store, loaders, runs, {"near": NEAR, "far": FAR}, 0.95, "openood")
    assert results["csid_sets"] == ["imagenet_v2", "imagenet_c"]
    for r, run in enumerate(results["runs"]):

        def triple(name: str, r: int = r) -> list[np.ndarray]:
            arrays = store[name]
            return [arrays["preds"][:, r], arrays["scores"][:, r], arrays["targets"]]

        want = openood_fsood(
            triple("imagenet"),
            {n: triple(n) for n in ("imagenet_v2", "imagenet_c")},
            {"near": {n: triple(n) for n in NEAR}, "far": {n: triple(n) for n in FAR}},
        )
        fsood = run["fsood"]
        got = {**fsood["ood"], "nearood": fsood["groups"]["near"], "farood": fsood["groups"]["far"]}
        assert set(got) == set(want)
        for row, (fpr, auroc, aupr_in, aupr_out, accuracy) in want.items():
            m = got[row]
            assert [100 * m["fpr95"], 100 * m["auroc"], 100 * m["aupr_in"], 100 * m["aupr_out"]] == pytest.approx(
                [fpr, auroc, aupr_in, aupr_out], abs=TOL
            ), row
            assert 100 * fsood["accuracy"] == pytest.approx(accuracy, abs=TOL)
        for name in ("imagenet_v2", "imagenet_c"):
            hand = np.mean(store[name]["preds"][:, r] == store[name]["targets"])
            assert fsood["csid_accuracy"][name] == pytest.approx(hand, abs=1e-12)
        # The standard metrics keep the ID test set alone as ID; the csid samples change the fsood ones.
        assert run["ood"]["ninco"] == ood_metrics(
            store["imagenet"]["scores"][:, r], store["ninco"]["scores"][:, r], convention="openood"
        )
        assert run["ood"]["ninco"] != fsood["ood"]["ninco"]
        assert fsood["mean"]["auroc"] == pytest.approx(np.mean([m["auroc"] for m in fsood["ood"].values()]))


def test_paper_convention_counts_the_csid_scores_as_id_scores() -> None:
    id_scores, csid_scores, ood = np.array([3.0, 2.0, 2.0, 1.0]), np.array([1.0, 0.5]), np.array([2.0, 0.5, 0.0])
    got = full_spectrum_metrics([id_scores, csid_scores], {"far": ood}, tpr=0.5)
    # ID = [3, 2, 2, 1, 1, .5]: t = 2 keeps 3 of 6, and 1 of 3 OOD scores is >= 2. AUROC: of 18 pairs, 12 ordered
    # (1 above OOD 2, 5 above OOD .5, 6 above OOD 0) and 3 tied (2~2 twice, .5~.5) -> (12 + 1.5) / 18.
    assert got["ood"]["far"]["fpr50"] == pytest.approx(1 / 3)
    assert got["ood"]["far"]["auroc"] == pytest.approx(13.5 / 18)
    assert got["mean"] == got["ood"]["far"] and got["groups"] == {}


def test_table_csv_and_scalars_carry_the_full_spectrum_results(case: tuple[dict, list, list], tmp_path) -> None:
    store, loaders, runs = case
    results = compute_results(store, loaders, runs, {"near": NEAR, "far": FAR}, 0.95, "paper")
    best = results["runs"][results["ranking"][0]]
    table = format_table(results)
    assert "Full-spectrum (ID = imagenet + the csid sets" in table
    assert f"imagenet_c {100 * best['fsood']['csid_accuracy']['imagenet_c']:.2f}%" in table
    assert f"| ninco | {100 * best['fsood']['ood']['ninco']['fpr95']:.2f} |" in table
    _, csv_path = write_results(results, str(tmp_path))
    with open(csv_path) as lines:
        rows = {(row["shaping"], row["set"]): row for row in csv.DictReader(lines)}
    assert len(rows) == 2 * (4 + 2 + 1) * 2 + 2 * 2  # runs × (sets, groups, mean) × (ood, fsood) + runs × csid sets
    for run in results["runs"]:
        row = rows[(run["shaping"], "fsood:group:near")]
        assert float(row["auroc"]) == run["fsood"]["groups"]["near"]["auroc"]
        assert float(row["id_accuracy"]) == run["fsood"]["accuracy"]
        row = rows[(run["shaping"], "csid:imagenet_v2")]
        assert row["auroc"] == "" and float(row["id_accuracy"]) == run["fsood"]["csid_accuracy"]["imagenet_v2"]
        assert float(rows[(run["shaping"], "ninco")]["id_accuracy"]) == run["id_accuracy"]
        scalars = full_spectrum_scalars(run)
        assert scalars["fsood/mean/fpr95"] == run["fsood"]["mean"]["fpr95"]
        assert scalars["fsood/group_far/auroc"] == run["fsood"]["groups"]["far"]["auroc"]
        assert scalars["csid/accuracy"] == run["fsood"]["accuracy"]
        assert scalars["csid/imagenet_c/accuracy"] == run["fsood"]["csid_accuracy"]["imagenet_c"]
        session = setting_metrics(run, 0.95)
        assert session["fsood_mean/aupr_out"] == run["fsood"]["mean"]["aupr_out"]
        assert session["csid/accuracy"] == run["fsood"]["accuracy"]


def test_without_csid_sets_nothing_changes(case: tuple[dict, list, list]) -> None:
    store, loaders, runs = case
    standard = [info for info in loaders if info["role"] != "csid"]
    with_csid = compute_results(store, loaders, runs, {"near": NEAR, "far": FAR})
    without = compute_results(store, standard, runs, {"near": NEAR, "far": FAR})
    assert "csid_sets" not in without and all("fsood" not in run for run in without["runs"])
    assert "Full-spectrum" not in format_table(without) and full_spectrum_scalars(without["runs"][0]) == {}
    for a, b in zip(with_csid["runs"], without["runs"], strict=True):
        assert {k: v for k, v in a.items() if k != "fsood"} == b


def test_main_py_test_reports_full_spectrum_results_everywhere(
    tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """One ``main.py test`` sweep with two csid sets and a detector fitted on data.fit: the JSON's fsood numbers are
    those of the saved scores with the csid sets counted as ID; the printed table, the CSV, the TensorBoard scalars
    and ``main.py report`` carry them. (The config is written with sorted keys: the sets are named in that order.)"""
    csid = {
        "shifted": {"kind": "npz", "path": str(write_npz(tmp_path / "shifted.npz", 29, 3, 0.8))},
        "tinted": {"kind": "npz", "path": str(write_npz(tmp_path / "tinted.npz", 19, 4, 0.7))},
    }
    config = tiny_config(tiny_data, tiny_checkpoint, tmp_path, shaping=["none", "ash_s@90"], score=["energy", "knn@5"])
    config["data"] |= {"csid": csid, "fit": {"kind": "npz", "path": str(tiny_data["id"]), "select": "0::2"}}
    proc = run_main(config, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run" / "v"
    results = json.loads((run_dir / "ood_results.json").read_text())
    assert results["csid_sets"] == ["shifted", "tinted"]
    assert results["counts"] == {"id": 101, "dark": 67, "bright": 53, "shifted": 29, "tinted": 19}
    store, meta = load_scores(str(run_dir))
    assert [info["role"] for info in meta["loaders"]] == ["id", "ood", "ood", "csid", "csid"]
    for r, run in enumerate(results["runs"]):
        as_id = np.concatenate([store[n]["scores"][:, r] for n in ("id", "shifted", "tinted")])
        for name in ("dark", "bright"):
            assert run["fsood"]["ood"][name] == pytest.approx(ood_metrics(as_id, store[name]["scores"][:, r]), abs=TOL)
            assert run["ood"][name] == pytest.approx(
                ood_metrics(store["id"]["scores"][:, r], store[name]["scores"][:, r]), abs=TOL
            )
        labelled = [store[n] for n in ("id", "shifted", "tinted")]
        correct = sum(int((a["preds"][:, r] == a["targets"]).sum()) for a in labelled)
        assert run["fsood"]["accuracy"] == pytest.approx(correct / (101 + 29 + 19), abs=1e-12)
        assert set(run["fsood"]["csid_accuracy"]) == {"shifted", "tinted"}
    assert "Full-spectrum (ID = id + the csid sets" in proc.stdout
    with open(run_dir / "ood_results.csv") as lines:
        csv_sets = [row["set"] for row in csv.DictReader(lines)]
    assert csv_sets.count("fsood:mean") == 4 and csv_sets.count("csid:tinted") == 4
    events = EventAccumulator(str(run_dir), size_guidance={"histograms": 0})
    events.Reload()
    best = results["runs"][0]
    prefix = f"{best['shaping']}|{best['score']}/"
    assert events.Scalars(f"{prefix}fsood/dark/auroc")[0].value == pytest.approx(best["fsood"]["ood"]["dark"]["auroc"])
    assert events.Scalars(f"{prefix}csid/accuracy")[0].value == pytest.approx(best["fsood"]["accuracy"])
    assert f"{prefix}scores/shifted" in events.Tags()["histograms"]
    (run_dir / "ood_results.json").unlink()
    report([str(run_dir)])
    assert json.loads((run_dir / "ood_results.json").read_text()) == results
