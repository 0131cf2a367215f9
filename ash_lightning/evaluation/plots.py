"""Matplotlib figures of results: ROC and PR curves per OOD set, and a sweep's mean metrics per shaping setting.

Figures are ``matplotlib.figure.Figure`` objects on their own Agg canvas, never pyplot's: importing or using this
module leaves the user's matplotlib backend and pyplot state as they were. Matplotlib is imported on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ash_lightning.evaluation.metrics import fpr_key

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MARKERS = "os^DvP*Xh<>p"
LINESTYLES: tuple[Literal["-", "--", ":", "-."], ...] = ("-", "--", ":", "-.")
BASELINE_COLOR = "0.3"


def agg_figure(width: float, height: float) -> Figure:
    """A ``width`` x ``height`` inch figure with constrained layout, drawn by Agg whatever pyplot's backend is."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def curves_figure(id_scores: np.ndarray, ood_scores: Mapping[str, np.ndarray], title: str) -> Figure:
    """ROC (ID positive) and precision-recall (ID positive) curves, one line per OOD set."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig = agg_figure(10, 4.2)
    roc_ax, pr_ax = fig.subplots(1, 2)
    for name, scores in ood_scores.items():
        labels = np.r_[np.ones(len(id_scores)), np.zeros(len(scores))]
        values = np.r_[id_scores, scores].astype(np.float64)
        fpr, tpr, _ = roc_curve(labels, values)
        precision, recall, _ = precision_recall_curve(labels, values)
        roc_ax.plot(fpr, tpr, label=name)
        pr_ax.plot(recall, precision, label=name)
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    roc_ax.set(xlabel="FPR (OOD accepted as ID)", ylabel="TPR (ID accepted)", title="ROC")
    pr_ax.set(xlabel="recall (ID)", ylabel="precision (ID)", title="PR, ID positive")
    roc_ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


@dataclass(frozen=True)
class _Setting:
    """A run's shaping setting as recorded in it (``results.run_entry``): ``spec``, ``name`` (the method) and
    ``percentile``. A run that records only its ``shaping`` label (one a LightningModule declared itself) is a
    method of its own, without a percentile."""

    spec: str
    name: str
    percentile: float | None

    @classmethod
    def of(cls, run: Mapping[str, Any]) -> _Setting:
        return cls(run["shaping"], run.get("method", run["shaping"]), run.get("percentile"))


def sweep_figure(runs: Sequence[Mapping[str, Any]], tpr: float) -> Figure | None:
    """Mean FPR@``tpr`` and mean AUROC of every shaped setting, one series (colour and marker) per method and
    score, the unshaped run of each score (method ``none``) as a horizontal reference line. The x axis is the
    percentile when a method was run at several; otherwise one slot per setting. Settings without a percentile
    (``react@1``, ``vra@80@95``) get labelled slots of their own. Methods and percentiles are read from the runs
    (``method``, ``percentile``), never parsed from their spec strings. None when no run is shaped."""
    fkey = fpr_key(tpr)
    points = [(_Setting.of(r), r["score"], 100 * r["mean"][fkey], 100 * r["mean"]["auroc"]) for r in runs]
    shaped = [p for p in points if p[0].name != "none"]
    if not shaped:
        return None
    methods = list(dict.fromkeys(shaper.name for shaper, *_ in shaped))
    scores = list(dict.fromkeys(score for _, score, *_ in points))
    positions, (tick_at, tick_labels), by_percentile = _sweep_axis([shaper for shaper, *_ in shaped])
    fig = agg_figure(11, 4.8)
    titles = (f"mean {fkey.upper()} (%), lower is better", "mean AUROC (%), higher is better")
    for col, (ax, title) in enumerate(zip(fig.subplots(1, 2), titles, strict=True)):
        for s, score in enumerate(scores):
            linestyle = LINESTYLES[s % len(LINESTYLES)]
            for shaper, run_score, *values in points:
                if shaper.name == "none" and run_score == score:
                    _reference_line(
                        ax, values[col], f"no shaping ({score})" if len(scores) > 1 else "no shaping", linestyle
                    )
            dodge = 0.0 if by_percentile else 0.12 * (s - (len(scores) - 1) / 2)
            for m, method in enumerate(methods):
                mine = [
                    (shaper, values[col])
                    for shaper, run_score, *values in shaped
                    if shaper.name == method and run_score == score
                ]
                color, marker = f"C{m % 10}", MARKERS[m % len(MARKERS)]
                line = sorted((shaper.percentile, y) for shaper, y in mine if shaper.percentile is not None)
                if by_percentile and len(line) > 1:
                    ax.plot(*zip(*line, strict=True), color=color, linestyle=linestyle, linewidth=1.6)
                ax.plot(
                    [positions[shaper.spec] + dodge for shaper, _ in mine],
                    [y for _, y in mine],
                    linestyle="none",
                    marker=marker,
                    markersize=8,
                    color=color,
                    markeredgewidth=1.5,
                    markerfacecolor=color if s == 0 else "white",
                )
        ax.set_xticks(tick_at, tick_labels)
        for label in ax.get_xticklabels():
            if not label.get_text().replace(".", "").isdigit():  # a setting's name, not a percentile
                label.set(rotation=30, ha="right")
        ax.set(title=title, xlabel="percentile p" if by_percentile else "shaping setting")
        ax.margins(x=0.08, y=0.1)
        ax.grid(alpha=0.3)
    fig.legend(
        handles=_sweep_legend(methods, scores),
        loc="outside lower center",
        ncol=min(len(methods) + len(scores) + 1, 6),
        fontsize=9,
        frameon=False,
    )
    fig.suptitle("Sweep: mean over the OOD sets per shaping setting")
    return fig


def _sweep_axis(shapers: Sequence[_Setting]) -> tuple[dict[str, float], tuple[list[float], list[str]], bool]:
    """x position per spec, (tick positions, tick labels), and whether the axis is the percentile: it is when
    some method was run at two or more, with the settings without one in labelled slots to the right; else the
    axis has one labelled slot per setting, grouped by method."""
    percentiles: dict[str, set[float]] = {}
    for shaper in shapers:
        if shaper.percentile is not None:
            percentiles.setdefault(shaper.name, set()).add(shaper.percentile)
    methods = list(dict.fromkeys(shaper.name for shaper in shapers))
    specs = list(dict.fromkeys(shaper.spec for shaper in sorted(shapers, key=lambda s: methods.index(s.name))))
    if not any(len(found) > 1 for found in percentiles.values()):
        return {spec: float(i) for i, spec in enumerate(specs)}, ([float(i) for i in range(len(specs))], specs), False
    swept = sorted(set().union(*percentiles.values()))
    step = max((swept[-1] - swept[0]) / max(len(swept) - 1, 1), 2.0)
    positions = {shaper.spec: shaper.percentile for shaper in shapers if shaper.percentile is not None}
    fixed = [spec for spec in specs if spec not in positions]
    positions.update({spec: swept[-1] + step * (i + 1) for i, spec in enumerate(fixed)})
    return positions, (swept + [positions[spec] for spec in fixed], [f"{p:g}" for p in swept] + fixed), True


def _reference_line(ax: Axes, value: float, label: str, linestyle: Literal["-", "--", ":", "-."]) -> None:
    """A grey horizontal line at ``value`` labelled at its right end."""
    ax.axhline(value, color=BASELINE_COLOR, linestyle=linestyle, linewidth=1.3, zorder=1)
    ax.annotate(
        label,
        xy=(1, value),
        xycoords=("axes fraction", "data"),
        xytext=(-4, 3),
        textcoords="offset points",
        ha="right",
        va="bottom",
        fontsize=8,
        color=BASELINE_COLOR,
    )


def _sweep_legend(methods: Sequence[str], scores: Sequence[str]) -> list[Any]:
    """Legend handles: one per method (colour and marker), one per score when there are several (line style
    and marker fill), one for the unshaped reference line."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=f"C{m % 10}", marker=MARKERS[m % len(MARKERS)], markersize=8, label=method)
        for m, method in enumerate(methods)
    ]
    if len(scores) > 1:
        handles += [
            Line2D(
                [],
                [],
                color="black",
                linestyle=LINESTYLES[s % len(LINESTYLES)],
                marker="o",
                markerfacecolor="black" if s == 0 else "white",
                label=f"score: {score}",
            )
            for s, score in enumerate(scores)
        ]
    handles.append(Line2D([], [], color=BASELINE_COLOR, linewidth=1.3, label="no shaping (reference)"))
    return handles
