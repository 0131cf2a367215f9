"""``main.py predict``: a run's chosen detector on new data, at the run's threshold (or a given one)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import ash_lightning
from ash_lightning.cli.app import main
from ash_lightning.evaluation.score_store import load_scores
from tests.conftest import REPO, main_in_process, tiny_config, write_image_folder
from tests.deploy.test_detector import id_images


@pytest.fixture(scope="module")
def run(tiny_data: dict, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished main.py test run of one setting (threshold on its ID test set)."""
    tmp_path = tmp_path_factory.mktemp("predict_run")
    status, _, err = main_in_process(tiny_config(tiny_data, tiny_checkpoint, tmp_path), tmp_path)
    assert status == 0, err[-3000:]
    return tmp_path / "run" / "v"


def predict(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["predict", *args])
    return status, out.getvalue(), err.getvalue()


def npz(path: Path) -> str:
    return yaml.safe_dump({"kind": "npz", "path": str(path)}, default_flow_style=True).strip()


QUIET = ("--trainer.enable_progress_bar", "false")


def latest(run: Path) -> Path:
    """The newest prediction folder of ``run`` (``predict/version_N``, the largest N)."""
    return max((run / "predict").iterdir(), key=lambda p: int(p.name.removeprefix("version_")))


def rows_of(folder: Path) -> list[dict[str, str]]:
    (csv_path,) = folder.rglob("predictions.csv")
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_on_the_id_test_set_flags_one_minus_tpr_and_on_an_ood_set_its_fpr95(run: Path, tiny_data: dict) -> None:
    results = json.loads((run / "ood_results.json").read_text())
    (entry,) = results["runs"]
    threshold = entry["threshold"]["value"]
    store, _ = load_scores(str(run))
    for name in ("id", "dark"):
        status, out, err = predict("--from_run", str(run), "--data.predict", npz(tiny_data[name]), *QUIET)
        assert status == 0, err[-3000:]
        folder = latest(run)
        rows = rows_of(folder)
        assert [int(r["index"]) for r in rows] == list(range(len(store[name]["index"])))
        scores = np.array([float(r["score"]) for r in rows])
        np.testing.assert_allclose(scores, store[name]["scores"][:, 0], rtol=1e-5, atol=1e-5)
        flagged = np.array([r["is_ood"] == "1" for r in rows])
        np.testing.assert_array_equal(flagged, scores < threshold)
        summary = json.loads((folder / "predictions_summary.json").read_text())
        assert summary["threshold"] == threshold and summary["count"] == len(rows)
        assert "run " + str(run) in summary["threshold_source"] and "'id' set" in summary["threshold_source"]
        assert f"{summary['flagged_ood']} flagged OOD" in out
        if name == "id":  # TPR 0.95 of 101 distinct scores keeps 96: 5 flagged
            assert flagged.sum() == 5 and flagged.mean() <= 1 - 0.95
        else:
            assert (~flagged).mean() == entry["ood"]["dark"]["fpr95"]  # flags (1 - FPR95) of it
        assert {r["pred"] for r in rows} <= {str(k) for k in range(10)}
        assert all(0.1 <= float(r["max_softmax"]) <= 1.0 for r in rows)


def test_load_detector_equals_predict_on_the_same_images(run: Path, tiny_data: dict) -> None:
    status, _, err = predict("--from_run", str(run), "--data.predict", npz(tiny_data["bright"]), *QUIET)
    assert status == 0, err[-3000:]
    rows = rows_of(latest(run))
    scores, is_ood = ash_lightning.load_detector(run)(id_images(tiny_data, "bright"))
    np.testing.assert_allclose(scores.numpy(), [float(r["score"]) for r in rows], rtol=1e-6, atol=1e-6)
    assert is_ood.tolist() == [r["is_ood"] == "1" for r in rows]


def test_a_given_threshold_on_an_image_folder_writes_paths_in_input_order(
    tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    write_image_folder(tmp_path / "images", 7, seed=3)
    config = tiny_config(tiny_data, tiny_checkpoint, tmp_path)
    config["data"]["predict"] = {"kind": "folder", "path": str(tmp_path / "images")}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    status, out, err = predict("--config", str(cfg), "--predict.threshold", "1e9")
    assert status == 0, err[-3000:]
    rows = rows_of(tmp_path / "run" / "v")
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in (tmp_path / "images").iterdir())
    assert all(r["is_ood"] == "1" for r in rows)  # every score is below 1e9
    assert "7 flagged OOD (100.00%)" in out and "from --predict.threshold" in out


def test_without_a_threshold_source_or_predict_data_one_error_names_the_fix(
    run: Path, tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    config = tiny_config(tiny_data, tiny_checkpoint, tmp_path)
    config["data"]["predict"] = {"kind": "npz", "path": str(tiny_data["dark"])}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    status, _, err = predict("--config", str(cfg))
    assert status == 2 and "--from_run <run folder>" in err and "--predict.threshold <t>" in err
    assert "Traceback" not in err
    status, _, err = predict("--from_run", str(run), *QUIET)  # the case: a config without predict data
    assert status == 2 and "data.predict, which is not set" in err and "--data.predict <spec>" in err
    assert "trainer option" not in err
    status, _, err = predict("--from_run", str(run), "--model.shaping", "ash_b@65", "--data.predict", "x")
    assert status == 2 and "no setting ash_b@65 + energy" in err and "ash_s@90 + energy" in err
    status, _, err = predict("--from_run", str(tmp_path / "nowhere"))
    assert status == 2 and "does not exist" in err


def test_help_says_what_predict_does(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "flag new images as OOD with a run" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    out = capsys.readouterr().out
    assert "predictions.csv" in out and "--from_run" in out and "--predict.threshold" in out


def test_ddp_two_processes_give_the_same_rows(run: Path, tiny_data: dict, tmp_path: Path) -> None:
    ddp = ("--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu")
    proc = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "predict", "--from_run", str(run)]
        + ["--data.predict", npz(tiny_data["dark"]), "--data.batch_size", "8", *QUIET, *ddp],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = rows_of(latest(run))
    status, _, err = predict("--from_run", str(run), "--data.predict", npz(tiny_data["dark"]), *QUIET)
    assert status == 0, err[-3000:]
    one = rows_of(latest(run))
    assert len(two) == 67 and [r["index"] for r in two] == [r["index"] for r in one]
    np.testing.assert_allclose([float(r["score"]) for r in two], [float(r["score"]) for r in one], rtol=1e-5)
    assert [r["is_ood"] for r in two] == [r["is_ood"] for r in one]
    assert torch.tensor([int(r["pred"]) for r in two]).equal(torch.tensor([int(r["pred"]) for r in one]))


def test_on_shared_cifar10_predict_flags_one_minus_tpr_of_the_id_set_and_one_minus_fpr95_of_mnist(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATASETS", str(shared_data))
    config = yaml.safe_load((REPO / "configs" / "cifar10_resnet20_ash_s.yaml").read_text())
    config["data"]["ood"] = {"mnist": config["data"]["ood"]["mnist"]}
    config["data"].pop("groups")
    for spec in [config["data"]["id"], config["data"]["ood"]["mnist"]]:
        spec["limit"] = 500
    config["data"].update(batch_size=250, num_workers=0)
    config["trainer"].update(accelerator="cpu", enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"].update(save_dir=str(tmp_path), name="run", version="v")
    status, _, err = main_in_process(config, tmp_path)
    assert status == 0, err[-3000:]
    run = tmp_path / "run" / "v"
    (entry,) = json.loads((run / "ood_results.json").read_text())["runs"]
    for name, spec in (("cifar10", config["data"]["id"]), ("mnist", config["data"]["ood"]["mnist"])):
        data = yaml.safe_dump(spec, default_flow_style=True).strip()
        status, _, err = predict("--from_run", str(run), "--data.predict", data, *QUIET)
        assert status == 0, err[-3000:]
        flagged = np.array([r["is_ood"] == "1" for r in rows_of(latest(run))])
        assert len(flagged) == 500
        if name == "cifar10":  # 475 of 500 kept at TPR 0.95; more only through ties at the threshold
            assert flagged.sum() <= 25 and flagged.sum() == np.sum(
                load_scores(str(run))[0]["cifar10"]["scores"] < entry["threshold"]["value"]
            )
        else:
            assert (~flagged).mean() == entry["ood"]["mnist"]["fpr95"]


def test_predict_options_given_to_test_are_an_error_not_ignored(
    tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    config = tiny_config(tiny_data, tiny_checkpoint, tmp_path)
    status, _, err = main_in_process(config, tmp_path, "--predict.threshold", "3.5")
    assert status == 2 and "--predict.threshold applies to `main.py predict` only" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
