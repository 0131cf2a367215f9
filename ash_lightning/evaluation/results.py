"""From saved per-sample scores to the results table: pure functions shared by the callback and ``report``.

Their input is a score store and its metadata (``ash_lightning.evaluation.score_store``, the ``scores.npz``
format).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ash_lightning._files import write_atomically
from ash_lightning.errors import UserError
from ash_lightning.evaluation.constant_scores import EQUAL_SCORES_FLAG, EQUAL_SCORES_LEGEND, equal_columns
from ash_lightning.evaluation.full_spectrum import full_spectrum_entry, full_spectrum_rows
from ash_lightning.evaluation.metrics import fpr_key, ood_metrics, summarize, threshold_at_tpr, top1_accuracy
from ash_lightning.evaluation.score_store import Store, scores_path
from ash_lightning.shaping.specs import Shaper

METRIC_LABELS = {"auroc": "AUROC", "aupr_in": "AUPR-In", "aupr_out": "AUPR-Out"}


def run_entry(shaper: Shaper, score: str) -> dict[str, Any]:
    """One run (one score column) as results and ``scores.npz`` record it: its ``shaping`` spec and ``score`` name,
    and the parsed shaping setting, ``method`` (the spec's name), ``params`` (its numbers) and ``percentile``
    (None without one), so that plots and reports read the setting instead of parsing the spec again."""
    return {
        "shaping": shaper.spec,
        "score": score,
        "method": shaper.name,
        "params": list(shaper.params),
        "percentile": shaper.percentile,
    }


def _set_metrics(
    id_scores: np.ndarray, sets: Mapping[str, np.ndarray], tpr: float, convention: str
) -> dict[str, dict[str, float]]:
    return {name: ood_metrics(id_scores, s, tpr=tpr, convention=convention) for name, s in sets.items()}


def threshold_entry(id_scores: np.ndarray, tpr: float, set_name: str) -> dict[str, Any]:
    """The operating point of one run on one ID set: ``value`` = :func:`threshold_at_tpr` (scores below it are
    flagged OOD), the ``tpr`` it keeps and the ``set`` it was computed on."""
    return {"value": threshold_at_tpr(id_scores, tpr), "tpr": tpr, "set": set_name}


def rank_runs(runs: Sequence[Mapping[str, Any]], key: str = "mean") -> list[int]:
    """Run positions sorted by mean FPR (ascending), then mean AUROC (descending)."""

    def order(i: int) -> tuple[float, float]:
        mean = runs[i][key]
        fpr = next(v for k, v in mean.items() if k.startswith("fpr"))
        return fpr, -mean["auroc"]

    return sorted(range(len(runs)), key=order)


def compute_results(
    store: Store,
    loaders: Sequence[Mapping[str, str]],
    runs: Sequence[Mapping[str, Any]],
    groups: Mapping[str, list[str]] | None = None,
    tpr: float = 0.95,
    convention: str = "paper",
) -> dict[str, Any]:
    """Per run: metrics per OOD set, their mean and group means, ID accuracy, the ``threshold`` at ``tpr`` on the
    ID test set (``threshold_entry``), ``equal_id_scores`` (every ID test sample has the same score, so the
    metrics mean nothing; ``flags`` then holds the legend of the table's mark), and with csid sets (role ``csid``)
    the full-spectrum results ``fsood`` (``full_spectrum_entry``); a ranking; and, when validation sets are
    present, per run the validation metrics and threshold on ``val_id``, and the run ``selected`` on them (lowest
    mean validation FPR, then AUROC) with that validation threshold."""
    by_role: dict[str, list[str]] = {}
    for info in loaders:
        by_role.setdefault(info["role"], []).append(info["name"])
    (id_name,) = by_role["id"]
    equal = set(equal_columns(store[id_name]["scores"]))
    out_runs = []
    for r, run in enumerate(runs):
        per_set = _set_metrics(
            store[id_name]["scores"][:, r], {n: store[n]["scores"][:, r] for n in by_role["ood"]}, tpr, convention
        )
        entry = {
            **run,
            "id_accuracy": top1_accuracy(store[id_name], r),
            "threshold": threshold_entry(store[id_name]["scores"][:, r], tpr, id_name),
            "equal_id_scores": r in equal,
            "ood": per_set,
            **summarize(per_set, groups),
        }
        if by_role.get("csid"):
            entry["fsood"] = full_spectrum_entry(
                store, id_name, by_role["csid"], by_role["ood"], r, groups, tpr, convention
            )
        if "val_id" in by_role:
            val_id = store[by_role["val_id"][0]]["scores"][:, r]
            val = _set_metrics(
                val_id,
                {n: store[n]["scores"][:, r] for n in by_role["val_ood"]},
                tpr,
                convention,
            )
            entry["validation"] = {
                "ood": val,
                "mean": summarize(val)["mean"],
                "threshold": threshold_entry(val_id, tpr, by_role["val_id"][0]),
            }
        out_runs.append(entry)
    results: dict[str, Any] = {
        "runs": out_runs,
        "ranking": rank_runs(out_runs),
        "counts": {n: int(len(a["index"])) for n, a in store.items()},
        "id": id_name,
        "ood_sets": by_role["ood"],
        **({"csid_sets": by_role["csid"]} if by_role.get("csid") else {}),
        "groups": dict(groups or {}),
        "tpr": tpr,
        "convention": convention,
        **({"flags": {"equal_id_scores": EQUAL_SCORES_LEGEND}} if equal else {}),
    }
    if "val_id" in by_role:
        best = rank_runs([r["validation"] for r in out_runs])[0]
        results["selected"] = {
            "run": best,
            "shaping": out_runs[best]["shaping"],
            "score": out_runs[best]["score"],
            "validation_mean": out_runs[best]["validation"]["mean"],
            "test_mean": out_runs[best]["mean"],
            "test_ood": out_runs[best]["ood"],
            "threshold": out_runs[best]["validation"]["threshold"],
        }
    return results


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _flag(run: Mapping[str, Any]) -> str:
    """`` EQUAL_SCORES_FLAG`` when the run's ID scores are all equal, else nothing."""
    return f" {EQUAL_SCORES_FLAG}" if run.get("equal_id_scores") else ""


def _flagged(run: Mapping[str, Any]) -> str:
    """The run's setting, ``<shaping> + <score>``, with ``_flag``."""
    return f"{run['shaping']} + {run['score']}{_flag(run)}"


def format_table(results: Mapping[str, Any]) -> str:
    """Markdown: per-set metrics of the run selected on validation data (without validation sets: the best on the
    test sets, or the only one); for sweeps, also all runs ranked. A setting whose ID scores are all equal is
    marked ``EQUAL_SCORES_FLAG``, with the legend line under the tables."""
    fkey = fpr_key(results["tpr"])
    runs = results["runs"]
    selected = "selected" in results
    best = runs[results["selected"]["run"] if selected else results["ranking"][0]]
    lines = [f"**Warning: {note}**\n" for note in results.get("warnings", [])]
    lines += [
        f"### {_flagged(best)}{' (selected on validation data)' if selected else ''}  "
        f"(ID accuracy {_pct(best['id_accuracy'])}%, convention {results['convention']})",
        "",
        *_metric_table(best, fkey),
        *_full_spectrum_table(best, results["id"], fkey),
    ]
    if len(runs) > 1:
        lines += [
            "",
            f"### All {len(runs)} settings, ranked by mean {fkey.upper()} then mean AUROC",
            "",
            f"| rank | shaping | score | mean {fkey.upper()} ↓ | mean AUROC ↑ | mean AUPR-In ↑ | ID acc |",
            "|---:|---|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {rank} | {runs[i]['shaping']} | {runs[i]['score']}{_flag(runs[i])} | {_pct(runs[i]['mean'][fkey])} | "
            f"{_pct(runs[i]['mean']['auroc'])} | {_pct(runs[i]['mean']['aupr_in'])} | "
            f"{_pct(runs[i]['id_accuracy'])} |"
            for rank, i in enumerate(results["ranking"], start=1)
        ]
    if "selected" in results:
        sel = results["selected"]
        lines += [
            "",
            f"Selected on validation data: **{_flagged(runs[sel['run']])}** (validation mean "
            f"{fkey.upper()} {_pct(sel['validation_mean'][fkey])}; test mean {fkey.upper()} "
            f"{_pct(sel['test_mean'][fkey])}, AUROC {_pct(sel['test_mean']['auroc'])})",
        ]
    if any(run.get("equal_id_scores") for run in runs):
        lines += ["", EQUAL_SCORES_LEGEND]
    return "\n".join(lines)


def _metric_table(part: Mapping[str, Any], fkey: str) -> list[str]:
    """The Markdown table of per-OOD-set metrics, group means and the mean of ``part`` (a run, or its ``fsood``)."""
    rows = [*part["ood"].items(), *((f"*{g}*", m) for g, m in part["groups"].items()), ("**mean**", part["mean"])]
    return [
        f"| OOD set | {fkey.upper()} ↓ | AUROC ↑ | AUPR-In ↑ | AUPR-Out ↑ |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {n} | {_pct(m[fkey])} | {_pct(m['auroc'])} | {_pct(m['aupr_in'])} | {_pct(m['aupr_out'])} |"
            for n, m in rows
        ),
    ]


def _full_spectrum_table(run: Mapping[str, Any], id_name: str, fkey: str) -> list[str]:
    """The full-spectrum part of a run's table (csid sets counted as ID), with the csid accuracies; none without."""
    fsood = run.get("fsood")
    if fsood is None:
        return []
    csid = ", ".join(f"{name} {_pct(accuracy)}%" for name, accuracy in fsood["csid_accuracy"].items())
    return [
        "",
        f"Full-spectrum (ID = {id_name} + the csid sets; accuracy of them pooled {_pct(fsood['accuracy'])}%; "
        f"csid accuracy: {csid})",
        "",
        *_metric_table(fsood, fkey),
    ]


def write_results(results: Mapping[str, Any], directory: str) -> tuple[str, str]:
    """Write ``ood_results.json`` and ``ood_results.csv`` (one row per run and OOD set, mean and group; with csid
    sets also the ``full_spectrum_rows``; then the row's accuracy and the run's ``equal_id_scores``), each
    atomically (``write_atomically``: a failed write leaves the file as it was)."""
    os.makedirs(directory, exist_ok=True)
    json_path, csv_path = os.path.join(directory, "ood_results.json"), os.path.join(directory, "ood_results.csv")
    text = json.dumps(results, indent=2, default=str)
    write_atomically(json_path, lambda tmp: Path(tmp).write_text(text))
    fkey = fpr_key(results["tpr"])
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["shaping", "score", "set", fkey, "auroc", "aupr_in", "aupr_out", "id_accuracy", "equal_id_scores"])
    for run in results["runs"]:
        rows = [*run["ood"].items(), *((f"group:{g}", m) for g, m in run["groups"].items()), ("mean", run["mean"])]
        for name, m, accuracy in [*((n, m, run["id_accuracy"]) for n, m in rows), *full_spectrum_rows(run)]:
            writer.writerow(
                [
                    run["shaping"],
                    run["score"],
                    name,
                    *(m.get(key, "") for key in (fkey, "auroc", "aupr_in", "aupr_out")),
                    accuracy,
                    bool(run.get("equal_id_scores")),
                ]
            )
    write_atomically(csv_path, lambda tmp: Path(tmp).write_text(table.getvalue(), newline=""))
    return json_path, csv_path


def reportable(names: Sequence[str], loaders: Sequence[Mapping[str, str]]) -> bool:
    """Whether the finished data sets ``names`` include the ID set and at least one OOD set."""
    roles = {info["role"] for info in loaders if info["name"] in names}
    return {"id", "ood"} <= roles


def stopped_message(reason: str, names: Sequence[str], loaders: Sequence[Mapping[str, str]], directory: str) -> str:
    """What a run stopped by ``reason`` kept: the saved sets and the ``report`` command that recomputes their
    metrics, or, before the first OOD set was finished, that there is nothing to report yet."""
    scores = scores_path(directory)
    if not reportable(names, loaders):
        return (
            f"OOD evaluation stopped by {reason} before its first OOD set was finished "
            f"(saved: {sorted(names) or 'nothing'}); there are no metrics to recompute. Fix: rerun it."
        )
    return (
        f"OOD evaluation stopped by {reason}; the scores of {sorted(names)} are saved in {scores}. "
        f"Recompute their metrics with: python main.py report {directory}"
    )


def random_weights_note(config: Mapping[str, Any]) -> str | None:
    """A warning when the run's model had neither ``checkpoint_path`` nor ``pretrained`` weights, else None."""
    model = config.get("model") or {}
    if "backbone" not in model or model.get("pretrained") or model.get("checkpoint_path"):
        return None
    return (
        f"RANDOM WEIGHTS: backbone {model['backbone']!r} had no checkpoint_path and pretrained: false, so these "
        "metrics describe an untrained network."
    )


def results_from_store(
    store: Store, meta: Mapping[str, Any], tpr: float | None = None, convention: str | None = None
) -> dict[str, Any]:
    """Recompute the results of a (possibly partial) store, at the saved ``tpr``/``convention`` unless given:
    data sets missing from it (a run that stopped before them) are left out and listed under ``missing``."""
    if not reportable(list(store), meta["loaders"]):
        raise UserError(
            "the saved scores hold no complete ID set and OOD set pair (the run stopped before its "
            "first OOD set was finished); nothing to recompute. Fix: rerun the evaluation."
        )
    loaders = [info for info in meta["loaders"] if info["name"] in store]
    present = {info["name"] for info in loaders}
    groups = {g: [n for n in members if n in present] for g, members in (meta.get("groups") or {}).items()}
    groups = {g: m for g, m in groups.items() if m}
    if any(info["role"] == "val_ood" for info in loaders) != any(info["role"] == "val_id" for info in loaders):
        loaders = [info for info in loaders if not info["role"].startswith("val")]
    results = compute_results(
        store,
        loaders,
        meta["runs"],
        groups,
        meta["tpr"] if tpr is None else tpr,
        meta["convention"] if convention is None else convention,
    )
    notes = [note for note in (random_weights_note(meta.get("config", {})),) if note]
    return {
        **results,
        **({"warnings": notes} if notes else {}),
        "missing": [info["name"] for info in meta["loaders"] if info["name"] not in store],
        "skipped": meta.get("skipped", {}),
        "dropped_nonfinite": meta.get("dropped_nonfinite", {}),
        "config": meta.get("config", {}),
    }
