"""What TensorBoard logging costs: its share of a CIFAR-10 run's wall time, and the event files of a 16-setting
sweep.

Config: ``configs/cifar10_resnet20_ash_s.yaml`` as shipped (akamaster ResNet-20, ASH-S@90 + energy, batch 500,
2 data workers, TensorBoardLogger, figures on), each set limited to ``--limit`` random images; then the same with
the 16-setting grid ASH-P, ASH-B, ASH-S and SCALE at 65/75/85/90. Each run is ``main.py test`` called in this
process, after a warm-up run on 100 images per set. Timed inside the run: ``OODMetricsCallback._log`` (everything
the callback sends to loggers: scalars, histograms, figures, and the summaries of
``ash_lightning.evaluation.tensorboard``) and, within it, ``log_results`` (those summaries alone: HParams sessions,
text, PR curves, metric-vs-percentile lines). Sizes: every ``events.out.tfevents.*`` file under the run's folder.
Targets (issue 23): logging under 2% of the run's wall time; the event files of a 16-setting sweep under 5 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

import ash_lightning.callbacks.ood_metrics as ood_metrics
from ash_lightning.cli.app import main as cli_main

from _common import (
    CIFAR10_CONFIG,
    ID_FILE,
    OOD_FILES,
    SWEEP_16,
    checkpoint_file,
    command_line,
    datasets_dir,
    machine_line,
    markdown_table,
    publish,
)

GRID = SWEEP_16
CONFIG = CIFAR10_CONFIG
SPENT: dict[str, float] = {}


def _timed(name: str, fn: Any) -> Any:
    """``fn`` adding its seconds to ``SPENT[name]``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] = SPENT.get(name, 0.0) + time.perf_counter() - start

    return wrapper


def run_config(limit: int, shaping: Any, out: Path) -> dict:
    """The shipped config with ``shaping``, ``limit`` images per set, logs under ``out``."""
    config = yaml.safe_load(CONFIG.read_text())
    config["model"]["shaping"] = shaping
    data = config["data"]
    data["id"] = {**data["id"], "limit": limit}
    data["ood"] = {name: {**spec, "limit": limit} for name, spec in data["ood"].items()}
    config["trainer"]["logger"]["init_args"].update(save_dir=str(out), version="v")
    return config


def timed_run(config: dict, scratch: Path) -> tuple[float, dict[str, float], Path]:
    """Wall seconds of one in-process ``main.py test``, the seconds spent logging, its run folder."""
    path = scratch / f"config_{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    SPENT.clear()
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main(["test", "--config", str(path)])
    seconds = time.perf_counter() - start
    if status != 0:
        sys.exit(f"error: the run failed:\n{err.getvalue()[-2000:]}")
    logger = config["trainer"]["logger"]["init_args"]
    return seconds, dict(SPENT), Path(logger["save_dir"]) / logger["name"] / logger["version"]


def event_bytes(folder: Path) -> tuple[int, int, int]:
    """Bytes of all event files under ``folder``, of those in it directly (the logger's own run), and their count."""
    files = [f for f in folder.rglob("events.out.tfevents.*") if f.is_file()]
    return sum(f.stat().st_size for f in files), sum(f.stat().st_size for f in files if f.parent == folder), len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=5000, help="images per data set (default 5000)")
    parser.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    args = parser.parse_args()
    datasets_dir([ID_FILE, *OOD_FILES.values(), checkpoint_file("cifar_resnet20")])
    ood_metrics.log_results = _timed("log_results", ood_metrics.log_results)
    ood_metrics.OODMetricsCallback._log = _timed("_log", ood_metrics.OODMetricsCallback._log)
    rows, sizes = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        timed_run(run_config(100, "ash_s@90", scratch / "warmup"), scratch)
        for label, shaping in (("1 setting (ash_s@90 + energy)", "ash_s@90"), (f"{len(GRID)}-setting sweep", GRID)):
            wall, spent, folder = timed_run(run_config(args.limit, shaping, scratch / label.split()[0]), scratch)
            total, own, count = event_bytes(folder)
            sizes[label] = total
            rows.append(
                [
                    label,
                    f"{wall:.1f}",
                    f"{spent['_log']:.2f} ({100 * spent['_log'] / wall:.2f}%)",
                    f"{spent['log_results']:.2f} ({100 * spent['log_results'] / wall:.2f}%)",
                    f"{total / 1e6:.2f} MB in {count} files ({own / 1e6:.2f} MB in the logger's run)",
                ]
            )
    worst_share = max(float(r[2].split("(")[1].rstrip("%)")) for r in rows)
    sweep_mb = sizes[f"{len(GRID)}-setting sweep"] / 1e6
    text = "\n".join(
        [
            "## TensorBoard logging: share of the run and event-file size (tensorboard_cost)",
            "",
            f"Generated by `{command_line()}` on {machine_line()}.",
            "",
            "`configs/cifar10_resnet20_ash_s.yaml` as shipped (batch 500, 2 data workers, TensorBoardLogger, figures "
            f"on), each of the 5 sets limited to {args.limit} random images (lowered from the full 10,000 to fit the "
            "shared machine); then the same with the 16-setting grid ASH-P/B/S and SCALE at 65/75/85/90. Each run is "
            "`main.py test` in one process after a warm-up run. *All logging* is `OODMetricsCallback._log`: scalars to "
            "every logger, score histograms, the ROC/PR and sweep figures (also saved as PNG), and *new summaries*, "
            "`log_results` of `ash_lightning/evaluation/tensorboard.py` (HParams sessions, text, PR curves, "
            "metric-vs-percentile lines), which it includes.",
            "",
            markdown_table(["run", "wall s", "all logging s (share)", "new summaries s (share)", "event files"], rows),
            "",
            f"Largest logging share: {worst_share:.2f}% ({'meets' if worst_share < 2 else 'MISSES'} the < 2% target); "
            f"event files of the 16-setting sweep: {sweep_mb:.2f} MB "
            f"({'meets' if sweep_mb < 5 else 'MISSES'} the < 5 MB target).",
        ]
    )
    publish("tensorboard_cost", text, args.write)


if __name__ == "__main__":
    main()
