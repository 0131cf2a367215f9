"""Figures: the user's matplotlib backend is never switched (torchmetrics imports pyplot, we must not call
``matplotlib.use``); the sweep figure shows the unshaped baseline and every setting, percentile sweeps and
mixed sweeps alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ash_lightning.evaluation.plots import sweep_figure
from ash_lightning.evaluation.results import run_entry
from ash_lightning.shaping.specs import get_shaping
from tests.conftest import REPO


def _run(shaping: str, score: str, fpr: float, auroc: float) -> dict:
    """A run as the module records it (with its parsed setting) and its mean metrics."""
    return {**run_entry(get_shaping(shaping), score), "mean": {"fpr95": fpr, "auroc": auroc}}


def test_importing_and_plotting_leave_the_matplotlib_backend_alone(tmp_path: Path) -> None:
    script = f"""
import os, sys
import matplotlib
before = matplotlib.get_backend()
import ash_lightning, ash_lightning.cli.app, ash_lightning.callbacks
after_import = matplotlib.get_backend()
from ash_lightning.evaluation.plots import curves_figure, sweep_figure
import numpy as np
runs = [{{"shaping": s, "score": "energy", "mean": {{"fpr95": f, "auroc": 1 - f}}}}
        for s, f in [("none", 0.5), ("ash_s@80", 0.4), ("ash_s@90", 0.3)]]
sweep_figure(runs, 0.95).savefig(os.path.join({str(tmp_path)!r}, "sweep.png"))
curves_figure(np.arange(5.0), {{"ood": np.arange(5.0) - 2}}, "t").savefig(os.path.join({str(tmp_path)!r}, "c.png"))
print(before, after_import, matplotlib.get_backend())
"""
    env = {"MPLBACKEND": "svg", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["svg", "svg", "svg"]
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "c.png").stat().st_size > 1000


def _reference_levels(ax) -> list[float]:  # noqa: ANN001 (matplotlib Axes)
    return sorted(
        line.get_ydata()[0]
        for line in ax.get_lines()
        if len(set(line.get_ydata())) == 1 and list(line.get_xdata()) == [0, 1]
    )


def test_percentile_sweep_has_one_series_per_method_and_the_baseline_per_score() -> None:
    runs = [_run("none", "energy", 0.5, 0.8), _run("none", "msp", 0.6, 0.7), _run("react@1.0", "energy", 0.45, 0.85)]
    runs += [
        _run(f"{m}@{p}", score, 0.4, 0.9) for m in ("ash_b", "ash_s") for p in (65, 90) for score in ("energy", "msp")
    ]
    fig = sweep_figure(runs, 0.95)
    fpr_ax, auroc_ax = fig.axes
    assert _reference_levels(fpr_ax) == [50, 60] and _reference_levels(auroc_ax) == [70, 80]
    ticks = [label.get_text() for label in fpr_ax.get_xticklabels()]
    assert ticks == ["65", "90", "react@1"]  # the setting without a percentile gets a labelled slot
    markers = {line.get_marker() for line in fpr_ax.get_lines() if line.get_marker() not in ("None", "")}
    assert len(markers) == 3  # ash_b, ash_s, react
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["react", "ash_b", "ash_s", "score: energy", "score: msp", "no shaping (reference)"]


def test_mixed_sweep_gives_each_setting_a_slot_and_none_alone_no_figure() -> None:
    runs = [
        _run("none", "energy", 0.5, 0.8),
        _run("ash_s@90", "energy", 0.3, 0.9),
        _run("dice@90", "energy", 0.4, 0.85),
        _run("vra@80@95", "energy", 0.35, 0.88),
        _run("react@p90", "energy", 0.42, 0.86),
    ]
    fig = sweep_figure(runs, 0.95)
    fpr_ax = fig.axes[0]
    assert [label.get_text() for label in fpr_ax.get_xticklabels()] == ["ash_s@90", "dice@90", "vra@80@95", "react@p90"]
    assert _reference_levels(fpr_ax) == [50]
    points = sorted(y for line in fpr_ax.get_lines() if line.get_linestyle() == "None" for y in line.get_ydata())
    assert points == [30, 35, 40, 42]
    assert sweep_figure([_run("none", "energy", 0.5, 0.8)], 0.95) is None


def test_the_sweep_reads_the_setting_from_the_runs_and_plots_labels_that_are_no_spec() -> None:
    """The figure reads each run's method and percentile; a run a LightningModule labelled itself (no setting
    recorded, a label that is no spec string) is a method of its own, not an error."""
    recorded = _run("ash_s@90", "energy", 0.3, 0.9)
    runs = [
        _run("none", "energy", 0.5, 0.8),
        recorded,
        {**recorded, "shaping": "ash_s, p=70", "percentile": 70.0, "mean": {"fpr95": 0.35, "auroc": 0.88}},
        {"shaping": "my_clip(2)", "score": "energy", "mean": {"fpr95": 0.45, "auroc": 0.82}},
    ]
    fig = sweep_figure(runs, 0.95)
    ticks = [label.get_text() for label in fig.axes[0].get_xticklabels()]
    assert ticks == ["70", "90", "my_clip(2)"]  # two ash_s percentiles: a percentile axis, the label a slot
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["ash_s", "my_clip(2)", "no shaping (reference)"]
