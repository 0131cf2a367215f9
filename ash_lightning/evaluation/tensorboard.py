"""TensorBoard summaries that answer "which setting is best": HParams sessions, text tables, PR curves and
metric-vs-parameter lines, from a results dict (``compute_results``) and its score store.

Everything is written under the log directory ``D`` of the run's ``SummaryWriter`` (TensorBoard shows each
folder as a run):

* ``D`` (the logger's own run): TEXT tags ``results/table`` (the ranked table as printed), ``results/selected``
  (per-set table of the selected setting), ``config`` (the run's config; LightningCLI's ``config.yaml`` when
  present) and ``notes`` (random weights, skipped files, dropped samples, missing sets).
* ``D/hparams/<shaping>+<score>``: one HParams session per setting. Hyper-parameters: ``shaping``, ``method``, its
  parameters (``percentile``, ``threshold`` ...), ``score``, ``score_method``, the score's parameters
  (``score.k`` ...), ``backbone``, ``placement``, ``checkpoint`` (file name), ``run`` (the folder ``D``).
  Metrics (scalars): ``mean/<fpr>``, ``mean/auroc``, ``mean/aupr_in``, ``mean/aupr_out``,
  ``mean_<group>/{<fpr>,auroc}``, ``set/<set>/{<fpr>,auroc}``, ``id/accuracy``, and with csid sets the
  full-spectrum means ``fsood_mean/...`` and ``csid/accuracy`` (pooled); ``<fpr>`` is ``fpr95`` at TPR 0.95.
  No experiment summary is written: TensorBoard builds the table's columns from all sessions under its logdir,
  so several runs in one folder share one table. A logger that wrote one (Lightning's ``TensorBoardLogger`` with
  its default ``default_hp_metric=True``) makes TensorBoard show that one's columns instead, so a warning asks for
  ``default_hp_metric=False`` (``main.py``'s default logger has it).
* ``D/sweep/<method>+<score>``: for a method run at two or more values of one parameter, the session metrics
  again as ``vs_<parameter>/<metric>`` with the parameter as the step (``vs_percentile/mean/fpr95``): one chart per
  metric, one line per method and score. A parameter with fractional values is scaled to integer steps and
  the tag says so (``vs_threshold_x10``). The unshaped setting of each score (``none+<score>``) is drawn as a flat
  line over the same steps.
* ``D/pr_curves/{selected,baseline}_<shaping>+<score>``: native PR curves ``pr/<set>`` (ID positive) of the selected
  setting and of the unshaped one with the same score when the run has it; one chart per OOD set.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ash_lightning._registry import Registry
from ash_lightning.detectors import is_detector_spec, parse_detector
from ash_lightning.evaluation.metrics import fpr_key
from ash_lightning.evaluation.results import Store, format_table
from ash_lightning.lightning_packages import rank_zero_warn
from ash_lightning.scores.specs import SCORES
from ash_lightning.shaping.specs import SHAPINGS, get_shaping

HParams = dict[str, float | str]
SESSIONS, SWEEPS, PR_CURVES = "hparams", "sweep", "pr_curves"
PR_THRESHOLDS = 127  # torch's pr_curve caps it there
_NUMBER = r"-?[0-9][0-9.eE+-]*"


def setting_name(run: Mapping[str, Any]) -> str:
    """``<shaping>+<score>``, the folder name of a setting's runs (characters unsafe in a path become ``_``)."""
    return re.sub(r"[^\w@.+=-]", "_", f"{run['shaping']}+{run['score']}")


def _form_values(form: str, spec: str) -> dict[str, float] | None:
    """``<name>`` -> value of a normalised ``spec`` matched against a registry ``form`` such as
    ``react@<threshold>|react@p<percentile>`` or ``gen[@<gamma>=0.1][@<m>=100]``; None when no alternative fits."""
    for alternative in form.split("|"):
        pattern = ""
        for part in re.split(r"(\[|\]|<\w+>(?:=[^\[\]]*)?)", alternative):
            if part in ("[", "]"):
                pattern += "(?:" if part == "[" else ")?"
            elif part.startswith("<"):
                pattern += f"(?P<{part[1:].split('>')[0]}>{_NUMBER})"
            else:
                pattern += re.escape(part)
        if found := re.fullmatch(pattern, spec):
            return {k: float(v) for k, v in found.groupdict().items() if v is not None}
    return None


def _form(registry: Registry[Any], name: str) -> str:
    """The form users write for ``name`` in ``registry``."""
    return next(entry.form for entry in registry.entries() if entry.name == name)


def setting_parameters(shaping: str, score: str) -> HParams:
    """The parsed setting: ``method`` and its parameters by name, ``score_method`` and its parameters as
    ``score.<name>``. Unknown specs (a user's own labels) are kept as given, without parameters."""
    out: HParams = {"shaping": shaping, "score": score}
    try:
        shaper = get_shaping(shaping)
    except ValueError:
        out["method"] = shaping.split("@")[0]
    else:
        out["method"] = shaper.name
        named = _form_values(_form(SHAPINGS, shaper.name), shaper.spec) or {}
        if shaper.percentile is not None:
            named.setdefault("percentile", shaper.percentile)
        out.update(named)
    name = score.split("@")[0]
    out["score_method"] = name
    try:
        if is_detector_spec(score):
            detector = parse_detector(score)
            values = {f.name: float(getattr(detector, f.name)) for f in detector.spec_fields()}
        elif name in SCORES:
            values = _form_values(_form(SCORES, name), score) or {}
        else:
            values = {}
    except ValueError:
        values = {}
    out.update({f"score.{k}": v for k, v in values.items()})
    return out


def setting_hparams(run: Mapping[str, Any], config: Mapping[str, Any], run_dir: str) -> HParams:
    """A session's hyper-parameters: the parsed setting, the model's ``backbone``/``placement``/``checkpoint``
    (file name) when the config has them, and ``run`` (the name of the run's log folder)."""
    model = config.get("model") or {}
    out = setting_parameters(run["shaping"], run["score"])
    for key in ("backbone", "placement"):
        if isinstance(model.get(key), str):
            out[key] = model[key]
    if model.get("checkpoint_path"):
        out["checkpoint"] = os.path.basename(str(model["checkpoint_path"]))
    elif "pretrained" in model:
        out["checkpoint"] = "pretrained" if model["pretrained"] else "random weights"
    out["run"] = os.path.basename(os.path.normpath(run_dir))
    return out


def setting_metrics(run: Mapping[str, Any], tpr: float) -> dict[str, float]:
    """A session's metrics: the four means, FPR and AUROC per group and per OOD set, ID accuracy (when known), the
    four full-spectrum means and the pooled csid accuracy (with csid sets); named so that TensorBoard's
    alphabetical columns start with the accuracies and the means."""
    fkey = fpr_key(tpr)
    out = {f"mean/{k}": run["mean"][k] for k in (fkey, "auroc", "aupr_in", "aupr_out")}
    for prefix, sets in (("mean_", run["groups"]), ("set/", run["ood"])):
        out.update({f"{prefix}{name}/{k}": m[k] for name, m in sets.items() for k in (fkey, "auroc")})
    if run.get("id_accuracy") is not None:
        out["id/accuracy"] = run["id_accuracy"]
    if "fsood" in run:
        out.update({f"fsood_mean/{k}": run["fsood"]["mean"][k] for k in (fkey, "auroc", "aupr_in", "aupr_out")})
        if run["fsood"]["accuracy"] is not None:
            out["csid/accuracy"] = run["fsood"]["accuracy"]
    return {k: float(v) for k, v in out.items()}


def _integer_steps(values: Sequence[float]) -> tuple[list[int], int]:
    """``values`` times the smallest of 1, 10, 100, 1000 that makes them all whole (else 1000), and that factor."""
    factor = 1
    while factor < 1000 and not all(float(v * factor).is_integer() for v in values):
        factor *= 10
    return [round(v * factor) for v in values], factor


def parameter_series(runs: Sequence[Mapping[str, Any]], tpr: float) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``<method>+<score>`` -> ``vs_<parameter>/<metric>`` -> (step, value) points, for each method and score run
    at two or more values of exactly one parameter; the unshaped run of a score (``none+<score>``) gets the same
    value at every step of that score's series."""
    settings = [(setting_parameters(r["shaping"], r["score"]), setting_metrics(r, tpr)) for r in runs]
    groups: dict[tuple[str, str], list[tuple[HParams, dict[str, float]]]] = {}
    for params, metrics in settings:
        groups.setdefault((str(params["method"]), str(params["score"])), []).append((params, metrics))
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    steps_of_score: dict[str, dict[str, set[int]]] = {}
    for (method, score), members in groups.items():
        names = {k for p, _ in members for k, v in p.items() if isinstance(v, float) and not k.startswith("score.")}
        varying = [k for k in sorted(names) if len({p.get(k) for p, _ in members}) > 1]
        if method == "none" or len(varying) != 1 or any(varying[0] not in p for p, _ in members):
            continue
        (param,) = varying
        steps, factor = _integer_steps([float(p[param]) for p, _ in members])
        prefix = f"vs_{param}" if factor == 1 else f"vs_{param}_x{factor}"
        lines = series.setdefault(setting_name({"shaping": method, "score": score}), {})
        for step, (_, metrics) in sorted(zip(steps, members, strict=True), key=lambda pair: pair[0]):
            for key, value in metrics.items():
                lines.setdefault(f"{prefix}/{key}", []).append((step, value))
        steps_of_score.setdefault(score, {}).setdefault(prefix, set()).update(steps)
    for params, metrics in settings:
        if params["method"] == "none" and params["score"] in steps_of_score:
            lines = series.setdefault(setting_name({"shaping": "none", "score": params["score"]}), {})
            for prefix, used in steps_of_score[str(params["score"])].items():
                for key, value in metrics.items():
                    lines[f"{prefix}/{key}"] = [(step, value) for step in sorted(used)]
    return series


def pr_curve_runs(results: Mapping[str, Any]) -> dict[str, int]:
    """Run folder -> run position: ``selected_<setting>`` (selected on validation data, else the best on the test
    sets) and ``baseline_<setting>``, the unshaped run with the selected one's score, when there is one."""
    runs = results["runs"]
    best = results["selected"]["run"] if "selected" in results else results["ranking"][0]
    out = {f"selected_{setting_name(runs[best])}": best}
    unshaped = [i for i, r in enumerate(runs) if r["shaping"].split("@")[0] == "none" and i != best]
    same_score = [i for i in unshaped if runs[i]["score"] == runs[best]["score"]]
    if same_score:
        out[f"baseline_{setting_name(runs[same_score[0]])}"] = same_score[0]
    return out


def pr_curve_data(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predictions) of a PR curve with ID as the positive class; the scores are mapped to [0, 1] by
    their rank among the distinct values, which keeps their order (a PR curve depends on nothing else)."""
    values = np.r_[id_scores, ood_scores].astype(np.float64)
    distinct, rank = np.unique(values, return_inverse=True)
    predictions = rank / max(len(distinct) - 1, 1)
    labels = np.r_[np.ones(len(id_scores), dtype=bool), np.zeros(len(ood_scores), dtype=bool)]
    return labels, predictions


def notes_text(results: Mapping[str, Any]) -> str:
    """Markdown list of what the run warned about, skipped, dropped or missed (or that it did none of these)."""
    lines = [f"* **{note}**" for note in results.get("warnings", [])]
    for name, paths in (results.get("skipped") or {}).items():
        lines.append(f"* {len(paths)} corrupt files of `{name}` skipped: " + ", ".join(f"`{p}`" for p in paths[:20]))
    for name, count in (results.get("dropped_nonfinite") or {}).items():
        lines.append(f"* {count} samples of `{name}` dropped: non-finite logits or scores")
    if results.get("missing"):
        lines.append("* data sets missing (the run stopped before them): " + ", ".join(results["missing"]))
    return "\n".join(lines) or "No warnings; no file skipped, no sample dropped, no data set missing."


def text_summaries(results: Mapping[str, Any], cli_config: str | None = None) -> dict[str, str]:
    """TEXT tag -> Markdown: the table as printed, the selected setting's per-set table, the config, the notes."""
    import yaml

    best = results["selected"]["run"] if "selected" in results else results["ranking"][0]
    alone = {k: v for k, v in results.items() if k not in ("selected", "warnings")}
    selected = format_table({**alone, "runs": [results["runs"][best]], "ranking": [0]})
    if "selected" in results:
        selected += "\n\nSelected on validation data."
    config = "```yaml\n" + yaml.safe_dump(_plain(results.get("config", {})), sort_keys=False) + "```"
    if cli_config is not None:
        config = (
            f"LightningCLI's `config.yaml`:\n\n```yaml\n{cli_config}\n```\n\nAs recorded with the results:\n\n{config}"
        )
    return {
        "results/table": format_table(results),
        "results/selected": selected,
        "config": config,
        "notes": notes_text(results),
    }


def _plain(value: Any) -> Any:
    """``value`` with mappings, sequences and scalars as YAML-safe built-ins (anything else as its ``str``)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def log_results(
    writer: Any,
    results: Mapping[str, Any],
    store: Store,
    step: int,
    run_writer: Callable[[str], Any] | None = None,
) -> None:
    """Write every summary of this module for one evaluation: text to ``writer`` (a ``SummaryWriter``), the
    sessions, series and PR curves to ``run_writer(folder)`` (default: a ``torch.utils.tensorboard`` ``FileWriter``
    under ``writer.get_logdir()``), each flushed and closed when written. A writer's thread writes the events: a
    write it failed (e.g. a full disk) is raised by the flush, as the OSError."""
    from torch.utils.tensorboard import summary

    log_dir = writer.get_logdir()
    if run_writer is None:
        from torch.utils.tensorboard.writer import FileWriter

        def run_writer(folder: str) -> Any:
            return FileWriter(os.path.join(log_dir, folder))

    if foreign_experiment(log_dir):
        rank_zero_warn(
            f"the TensorBoard run {log_dir} holds an HParams experiment written by its logger, so TensorBoard's "
            "HPARAMS tab shows that one's columns, not those of the ash-lightning settings. Fix: "
            "TensorBoardLogger(..., default_hp_metric=False) (the logger's hp_metric is a placeholder anyway)."
        )
    cli_path = os.path.join(log_dir, "config.yaml")
    cli_config = open(cli_path).read() if os.path.isfile(cli_path) else None  # noqa: SIM115 (read at once)
    for tag, text in text_summaries(results, cli_config).items():
        writer.add_text(tag, text, step)
    config = results.get("config") or {}
    for run in results["runs"]:
        metrics = setting_metrics(run, results["tpr"])
        _, start, end = summary.hparams(setting_hparams(run, config, log_dir), metrics)
        _write(run_writer(f"{SESSIONS}/{setting_name(run)}"), [start, end], metrics, step)
    for name, lines in parameter_series(results["runs"], results["tpr"]).items():
        sweep = run_writer(f"{SWEEPS}/{name}")
        for tag, points in lines.items():
            for at, value in points:
                sweep.add_summary(summary.scalar(tag, value), at)
        _close(sweep)
    for folder, r in pr_curve_runs(results).items():
        curves = run_writer(f"{PR_CURVES}/{folder}")
        for name in results["ood_sets"]:
            labels, predictions = pr_curve_data(store[results["id"]]["scores"][:, r], store[name]["scores"][:, r])
            curves.add_summary(summary.pr_curve(f"pr/{name}", labels, predictions, PR_THRESHOLDS), step)
        _close(curves)


def foreign_experiment(log_dir: str, events: int = 100) -> bool:
    """Whether an events file directly in ``log_dir`` holds an HParams experiment summary among its first
    ``events`` records (Lightning's loggers write theirs first, when testing starts)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams.metadata import EXPERIMENT_TAG

    for name in sorted(os.listdir(log_dir)):
        if "tfevents" in name and os.path.isfile(os.path.join(log_dir, name)):
            for count, event in enumerate(EventFileLoader(os.path.join(log_dir, name)).Load()):
                if count >= events:
                    break
                if any(value.tag == EXPERIMENT_TAG for value in event.summary.value):
                    return True
    return False


def _write(run: Any, summaries: Sequence[Any], scalars: Mapping[str, float], step: int) -> None:
    """Add ``summaries`` and the ``scalars`` at ``step`` to ``run`` and ``_close`` it."""
    from torch.utils.tensorboard import summary

    for item in summaries:
        run.add_summary(item, step)
    for tag, value in scalars.items():
        if math.isfinite(value):
            run.add_summary(summary.scalar(tag, value), step)
    _close(run)


def _close(run: Any) -> None:
    """Flush ``run`` (raising what its thread failed to write: ``close`` alone does not), then close it."""
    run.flush()
    run.close()
