"""TensorBoard as a user opens it: a ``tensorboard`` server on the loopback over a run's log folder, its tabs read
back through the HTTP API the browser uses (HParams sessions, TEXT, PR_CURVES, scalar series with their steps)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ash_lightning.evaluation.tensorboard import parameter_series, pr_curve_data, setting_parameters
from tests.conftest import main_in_process, tiny_config

TENSORBOARD = Path(sys.executable).with_name("tensorboard")
STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


class Board:
    """A running ``tensorboard`` server's HTTP API."""

    def __init__(self, port: int) -> None:
        self.port = port

    def get(self, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def sessions(self) -> dict[str, dict]:
        """Session name -> {"hparams": ..., "metrics": tag -> value} of the HPARAMS tab."""
        groups = self.get(
            "/data/plugin/hparams/session_groups",
            {"experimentName": "", "allowedStatuses": STATUSES, "colParams": [], "startIndex": 0, "sliceSize": 1000},
        )["sessionGroups"]
        return {
            g["name"]: {"hparams": g["hparams"], "metrics": {m["name"]["tag"]: m["value"] for m in g["metricValues"]}}
            for g in groups
        }

    def scalars(self, run: str, tag: str) -> list[tuple[int, float]]:
        query = urllib.parse.urlencode({"run": run, "tag": tag})
        return [(step, value) for _, step, value in self.get(f"/data/plugin/scalars/scalars?{query}")]


@contextmanager
def tensorboard(logdir: Path, wait_for: str) -> Iterator[Board]:
    """``tensorboard --logdir logdir`` on 127.0.0.1 at a free port, until the run ``wait_for`` is listed (at most
    60 s); killed on exit."""
    if not TENSORBOARD.is_file():
        pytest.skip(f"no tensorboard command next to {sys.executable}")
    proc = subprocess.Popen(
        [str(TENSORBOARD), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0", "--load_fast=false"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        port = None
        assert proc.stderr is not None
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            if found := re.search(r"http://127\.0\.0\.1:(\d+)/", line):
                port = int(found.group(1))
        assert port is not None, "tensorboard did not start"
        board = Board(port)
        while wait_for not in board.get("/data/runs"):
            assert time.monotonic() < deadline, f"tensorboard did not list {wait_for!r}: {board.get('/data/runs')}"
            time.sleep(0.5)
        time.sleep(1.0)  # the first load reads the runs in one pass; let it finish the folder
        yield board
    finally:
        proc.kill()
        proc.wait(10)


SWEEP = ["none", "ash_s@70", "ash_s@80", "ash_s@90", "react@1"]


def test_main_test_sweep_in_tensorboard(tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_data, tiny_checkpoint, tmp_path / "logs", shaping=SWEEP, score=["energy", "msp"])
    status, _, err = main_in_process(config, tmp_path)
    assert status == 0, err[-3000:]
    results = json.loads((tmp_path / "logs" / "run" / "v" / "ood_results.json").read_text())
    runs = {(r["shaping"], r["score"]): r for r in results["runs"]}
    with tensorboard(tmp_path / "logs", wait_for="run/v/sweep/ash_s+msp") as board:
        assert {"hparams", "text", "pr_curves", "scalars", "images"} <= {
            name for name, plugin in board.get("/data/plugins_listing").items() if plugin["enabled"]
        }
        experiment = board.get("/data/plugin/hparams/experiment", {"experimentName": ""})
        columns = {h["name"] for h in experiment["hparamInfos"]}
        assert {"method", "percentile", "threshold", "score", "backbone", "placement", "checkpoint"} <= columns
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"mean/fpr95", "mean/auroc", "mean/aupr_in", "mean/aupr_out", "id/accuracy"} <= metrics
        assert {"mean_near/fpr95", "mean_far/auroc", "set/dark/fpr95", "set/bright/auroc"} <= metrics

        sessions = board.sessions()
        assert len(sessions) == len(SWEEP) * 2
        session = sessions["run/v/hparams/ash_s@80+energy"]
        assert session["hparams"]["method"] == "ash_s" and session["hparams"]["percentile"] == 80
        assert session["hparams"]["checkpoint"] == tiny_checkpoint.name
        assert sessions["run/v/hparams/react@1+msp"]["hparams"]["threshold"] == 1
        expected = runs[("ash_s@80", "energy")]
        assert session["metrics"]["mean/fpr95"] == pytest.approx(expected["mean"]["fpr95"], rel=1e-6)
        assert session["metrics"]["set/dark/auroc"] == pytest.approx(expected["ood"]["dark"]["auroc"], rel=1e-6)

        texts = board.get("/data/plugin/text/tags")["run/v"]
        assert {"results/table", "results/selected", "config", "notes"} <= {t.split("/text_summary")[0] for t in texts}

        def text(tag: str) -> str:
            query = urllib.parse.urlencode({"run": "run/v", "tag": f"{tag}/text_summary"})
            return board.get(f"/data/plugin/text/text?{query}")[0]["text"]

        assert "ranked by mean FPR95" in text("results/table") and "<table>" in text("results/table")
        assert "LightningCLI" in text("config") and "cifar_resnet20" in text("config")
        assert "no sample dropped" in text("notes")

        curves = board.get("/data/plugin/pr_curves/tags")
        best = results["runs"][results["ranking"][0]]
        selected = f"run/v/pr_curves/selected_{best['shaping']}+{best['score']}"
        assert set(curves[selected]) == {"pr/dark", "pr/bright"}
        if best["shaping"] != "none":
            assert set(curves[f"run/v/pr_curves/baseline_none+{best['score']}"]) == {"pr/dark", "pr/bright"}

        line = board.scalars("run/v/sweep/ash_s+energy", "vs_percentile/mean/fpr95")
        assert [step for step, _ in line] == [70, 80, 90]
        assert [value for _, value in line] == pytest.approx(
            [runs[(f"ash_s@{p}", "energy")]["mean"]["fpr95"] for p in (70, 80, 90)]
        )
        flat = board.scalars("run/v/sweep/none+msp", "vs_percentile/set/dark/auroc")
        assert [step for step, _ in flat] == [70, 80, 90]
        assert [value for _, value in flat] == pytest.approx([runs[("none", "msp")]["ood"]["dark"]["auroc"]] * 3)
        # what every logger got before stays
        assert board.scalars("run/v", "ash_s@80|energy/ood/mean/fpr95")[0][1] == pytest.approx(
            expected["mean"]["fpr95"], rel=1e-6
        )


def _user_run(
    package: str, log_dir: Path, version: int, shaping: str, default_hp_metric: bool = False, csv: bool = False
) -> None:
    """A user's project: their own LightningModule (with saved hyper-parameters), ``ActivationShapingCallback``,
    ``OODMetricsCallback``, the package's TensorBoardLogger."""
    pl = pytest.importorskip(package if package == "pytorch_lightning" else "lightning.pytorch")
    from ash_lightning.callbacks import ActivationShapingCallback, OODMetricsCallback

    class Net(pl.LightningModule):
        def __init__(self, width: int = 16) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU())
            self.fc = torch.nn.Linear(width, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.body(x))

        def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
            return self(batch[0])

    def loader(offset: float, seed: int) -> DataLoader:
        x = torch.randn(40, 4, generator=torch.Generator().manual_seed(seed)) + offset
        return DataLoader(TensorDataset(x, torch.zeros(40, dtype=torch.long), torch.arange(40)), batch_size=16)

    torch.manual_seed(version)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(str(log_dir), name="project", version=version)
        if csv
        else pl.loggers.TensorBoardLogger(
            str(log_dir), name="project", version=version, default_hp_metric=default_hp_metric
        ),
        callbacks=[
            ActivationShapingCallback(shaping),
            OODMetricsCallback(ood_names=["near", "far"], verbose=False),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.test(Net(), dataloaders=[loader(0, 0), loader(0.5, 1), loader(2, 2)], verbose=False)


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning"])
def test_callbacks_in_a_users_project_two_runs_in_one_folder(package: str, tmp_path: Path) -> None:
    specs = {0: "ash_s@60", 1: "ash_s@80"}
    for version, shaping in specs.items():
        _user_run(package, tmp_path, version, shaping)
    with tensorboard(tmp_path, wait_for="project/version_1/hparams/ash_s@80+energy") as board:
        sessions = board.sessions()
        experiment = board.get("/data/plugin/hparams/experiment", {"experimentName": ""})
        assert {"method", "percentile", "score", "run"} <= {h["name"] for h in experiment["hparamInfos"]}
        assert {"mean/fpr95", "set/far/auroc"} <= {m["name"]["tag"] for m in experiment["metricInfos"]}
        texts, curves = board.get("/data/plugin/text/tags"), board.get("/data/plugin/pr_curves/tags")
        for version, shaping in specs.items():
            run_dir = f"project/version_{version}"
            (run,) = json.loads((tmp_path / run_dir / "ood_results.json").read_text())["runs"]
            session = sessions[f"{run_dir}/hparams/{shaping}+energy"]
            assert session["hparams"]["run"] == f"version_{version}"
            assert session["hparams"]["percentile"] == int(shaping.split("@")[1])
            assert session["metrics"]["mean/auroc"] == pytest.approx(run["mean"]["auroc"], rel=1e-6)
            assert session["metrics"]["set/far/fpr95"] == pytest.approx(run["ood"]["far"]["fpr95"], rel=1e-6)
            assert "notes/text_summary" in texts[run_dir]
            assert set(curves[f"{run_dir}/pr_curves/selected_{shaping}+energy"]) == {"pr/near", "pr/far"}
            ((_, value),) = board.scalars(run_dir, "ood/far/auroc")  # what every logger got before
            assert value == pytest.approx(run["ood"]["far"]["auroc"], rel=1e-6)


def test_a_logger_that_writes_its_own_hparams_experiment_is_named(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="default_hp_metric=False"):
        _user_run("pytorch_lightning", tmp_path, 0, "ash_s@60", default_hp_metric=True)


def test_a_csv_logger_gets_what_it_got_before(tmp_path: Path) -> None:
    _user_run("pytorch_lightning", tmp_path, 0, "ash_s@60", csv=True)
    run_dir = tmp_path / "project" / "version_0"
    assert {"ood_results.json", "ood_results.csv", "scores.npz", "curves.png", "metrics.csv"} <= {
        p.name for p in run_dir.iterdir()
    }
    assert not [p for p in tmp_path.rglob("*") if "tfevents" in p.name or p.name in ("hparams", "pr_curves")]
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"ood/far/auroc", "ood/near/fpr95", "ood/mean/aupr_in", "id/accuracy"} <= set(header)


def test_parameters_are_named_by_the_registered_forms() -> None:
    assert setting_parameters("react@p90", "knn@50") == {
        "shaping": "react@p90",
        "score": "knn@50",
        "method": "react",
        "percentile": 90.0,
        "score_method": "knn",
        "score.k": 50.0,
        "score.fraction": 1.0,
    }
    assert setting_parameters("react_and_ash@1.5@90", "energy@2")["threshold"] == 1.5
    assert setting_parameters("react_and_ash@1.5@90", "energy@2")["score.temperature"] == 2.0
    assert setting_parameters("my_own", "scores from test_step")["method"] == "my_own"


def test_fractional_parameters_become_scaled_steps() -> None:
    def run(shaping: str, fpr: float) -> dict:
        metrics = {"fpr95": fpr, "auroc": 1 - fpr, "aupr_in": 0.5, "aupr_out": 0.5}
        return {"shaping": shaping, "score": "energy", "mean": metrics, "groups": {}, "ood": {"a": metrics}}

    series = parameter_series([run("react@0.5", 0.4), run("react@1.25", 0.3), run("ash_s@90", 0.2)], 0.95)
    assert list(series) == ["react+energy"]  # ash_s was run at one percentile only: no line
    assert series["react+energy"]["vs_threshold_x100/mean/fpr95"] == [(50, 0.4), (125, 0.3)]


def test_pr_curve_predictions_keep_the_score_order_with_id_positive() -> None:
    id_scores, ood_scores = np.array([3.0, -1.0, 7.5, 3.0]), np.array([-20.0, 3.0, 0.5])
    labels, predictions = pr_curve_data(id_scores, ood_scores)
    assert labels.tolist() == [True] * 4 + [False] * 3
    assert predictions.min() == 0 and predictions.max() == 1
    values = np.r_[id_scores, ood_scores]
    for i in range(len(values)):
        for j in range(len(values)):
            assert np.sign(predictions[i] - predictions[j]) == np.sign(values[i] - values[j])
