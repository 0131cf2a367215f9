"""``load_detector`` / ``OODDetector``: a finished run's settings, rebuilt without Lightning, give its saved scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import ash_lightning
from ash_lightning.data import OODDataModule
from ash_lightning.errors import UserError
from ash_lightning.evaluation.metrics import fpr_key
from ash_lightning.evaluation.score_store import load_scores
from tests.conftest import main_in_process, tiny_config

SHAPINGS, SCORES = ["ash_s@90", "react@p90"], ["energy", "knn@5"]


@pytest.fixture(scope="module")
def sweep_run(tiny_data: dict, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A main.py sweep with a calibrated shaping and a fitted detector, selected on validation data."""
    tmp_path = tmp_path_factory.mktemp("sweep_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASH_CACHE_DIR", str(tmp_path / "cache"))
        config = tiny_config(tiny_data, tiny_checkpoint, tmp_path, shaping=SHAPINGS, score=SCORES)
        config["data"]["fit"] = {"kind": "npz", "path": str(tiny_data["id"]), "limit": 60}
        config["data"]["val_id"] = {"kind": "npz", "path": str(tiny_data["id"]), "limit": 50}
        config["data"]["val_ood"] = {"dark": {"kind": "npz", "path": str(tiny_data["dark"]), "limit": 30}}
        status, _, err = main_in_process(config, tmp_path)
    assert status == 0, err[-3000:]
    return tmp_path / "run" / "v"


def id_images(tiny_data: dict, name: str = "id") -> torch.Tensor:
    """The set's images as the run transformed them, in order."""
    datamodule = OODDataModule(
        id={"kind": "npz", "path": str(tiny_data["id"])},
        ood={"x": "unused"},
        predict={"kind": "npz", "path": str(tiny_data[name])},
        backbone="cifar_resnet20",
    )
    return torch.cat([x for x, _, _ in datamodule.predict_dataloader()])


@pytest.mark.parametrize("refit", [False, True], ids=["from_caches", "refitted"])
def test_every_setting_gives_the_runs_saved_scores_and_flags_at_its_threshold(
    sweep_run: Path, tiny_data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refit: bool
) -> None:
    monkeypatch.setenv("ASH_CACHE_DIR", str(sweep_run.parents[1] / "cache") if not refit else str(tmp_path))
    store, meta = load_scores(str(sweep_run))
    images = {name: id_images(tiny_data, name) for name in ("id", "dark")}
    for column, run in enumerate(meta["runs"]):
        detector = ash_lightning.load_detector(sweep_run, run["shaping"], run["score"])
        assert isinstance(detector, ash_lightning.OODDetector)
        for name in ("id", "dark"):
            scores, is_ood = detector(images[name])
            np.testing.assert_allclose(scores.double().numpy(), store[name]["scores"][:, column], rtol=1e-5, atol=1e-5)
            assert torch.equal(is_ood, scores.double() < detector.threshold)
    if refit:  # the refitted statistics were written to the (empty) cache
        assert any(tmp_path.rglob("*"))


def test_the_selected_setting_flags_one_minus_tpr_of_val_id_and_the_validation_fpr_of_val_ood(
    sweep_run: Path, tiny_data: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    monkeypatch.setenv("ASH_CACHE_DIR", str(sweep_run.parents[1] / "cache"))
    results = json.loads((sweep_run / "ood_results.json").read_text())
    selected = results["selected"]
    detector = ash_lightning.load_detector(sweep_run)
    assert detector.threshold == selected["threshold"]["value"]
    assert selected["threshold"]["set"] == "val_id"
    _, is_ood_val = detector(id_images(tiny_data)[:50])
    assert is_ood_val.double().mean() <= 1 - 0.95 + 1e-12  # at least TPR kept; fewer flagged only through ties
    _, is_ood_dark = detector(id_images(tiny_data, "dark")[:30])
    validation_fpr = selected["validation_mean"][fpr_key(0.95)]
    assert 1 - is_ood_dark.double().mean().item() == pytest.approx(validation_fpr, abs=1e-12)


def test_a_setting_the_run_lacks_and_a_folder_without_a_run_are_one_user_error(sweep_run: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no setting ash_b@65 \+ energy.*ash_s@90 \+ energy.*--predict.threshold"):
        ash_lightning.load_detector(sweep_run, "ash_b@65", "energy")
    with pytest.raises(UserError, match="neither ood_results.json nor scores.npz"):
        ash_lightning.load_detector(tmp_path)


def test_ood_detector_from_parts_refuses_unfitted_settings() -> None:
    import timm

    model = timm.create_model("cifar_resnet20")
    with pytest.raises(ValueError, match="calibrate"):
        ash_lightning.OODDetector(model, "react@p90", "energy", 0.0)
    with pytest.raises(ValueError, match="fit_detector"):
        ash_lightning.OODDetector(model, "none", "knn@5", 0.0)
    scores, is_ood = ash_lightning.OODDetector(model, "none", "odin", 0.5)(torch.rand(3, 3, 32, 32))
    assert scores.shape == is_ood.shape == (3,)


def test_a_callbacks_run_folder_with_the_users_network(tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A run of OODMetricsCallback + ActivationShapingCallback in a plain Lightning module: load_detector takes the
    user's network (and, for a calibrated shaping, its fit data) and gives the run's saved scores."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from ash_lightning.callbacks import ActivationShapingCallback, OODMetricsCallback
    from tests.evaluation.test_evaluation import PlainClassifier

    fit = {"kind": "npz", "path": str(tiny_data["id"]), "limit": 40}
    datamodule = OODDataModule(
        id={"kind": "npz", "path": str(tiny_data["id"])},
        ood={"dark": {"kind": "npz", "path": str(tiny_data["dark"])}},
        fit=fit,
        backbone="cifar_resnet20",
        batch_size=16,
    )
    module = PlainClassifier(tiny_checkpoint)
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[ActivationShapingCallback("react@p90"), OODMetricsCallback(ood_names=["dark"])],
        enable_progress_bar=False,
        logger=TensorBoardLogger(str(tmp_path), name="run", version="v"),
    )
    trainer.test(module, datamodule=datamodule)
    run = tmp_path / "run" / "v"
    store, _ = load_scores(str(run))
    with pytest.raises(UserError, match="fit_data="):
        ash_lightning.load_detector(run, model=module.net)
    detector = ash_lightning.load_detector(run, model=module.net, fit_data=datamodule.fit_dataloader())
    assert detector.shaper.spec == "react@p90"
    scores, _ = detector(id_images(tiny_data, "dark"))
    np.testing.assert_allclose(scores.double().numpy(), store["dark"]["scores"][:, 0], rtol=1e-5, atol=1e-5)


def test_predict_with_another_setting_of_the_run_uses_its_validation_threshold(
    sweep_run: Path, tiny_data: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from tests.cli.test_predict import QUIET, latest, npz, predict, rows_of

    monkeypatch.setenv("ASH_CACHE_DIR", str(sweep_run.parents[1] / "cache"))
    args = ("--from_run", str(sweep_run), "--model.shaping", "react@p90", "--model.score", "knn@5")
    status, out, err = predict(*args, "--data.predict", npz(tiny_data["bright"]), *QUIET)
    assert status == 0, err[-3000:]
    results = json.loads((sweep_run / "ood_results.json").read_text())
    column = [(r["shaping"], r["score"]) for r in results["runs"]].index(("react@p90", "knn@5"))
    threshold = results["runs"][column]["validation"]["threshold"]
    summary = json.loads((latest(sweep_run) / "predictions_summary.json").read_text())
    assert summary["threshold"] == threshold["value"] and "'val_id' set (react@p90 + knn@5)" in out
    rows = rows_of(latest(sweep_run))
    store, _ = load_scores(str(sweep_run))
    np.testing.assert_allclose([float(r["score"]) for r in rows], store["bright"]["scores"][:, column], rtol=1e-5)


def test_skipped_corrupt_files_are_left_out_and_counted(tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path) -> None:
    import yaml

    from tests.cli.test_predict import predict, rows_of
    from tests.conftest import write_image_folder

    write_image_folder(tmp_path / "images", 5, seed=4, truncated=("broken.jpg",))
    config = tiny_config(tiny_data, tiny_checkpoint, tmp_path)
    config["data"].update(predict={"kind": "folder", "path": str(tmp_path / "images")}, skip_corrupt=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    status, out, err = predict("--config", str(tmp_path / "config.yaml"), "--predict.threshold", "0")
    assert status == 0, err[-3000:]
    rows = rows_of(tmp_path / "run" / "v")
    assert len(rows) == 5 and not any(r["path"].endswith("broken.jpg") for r in rows)
    assert "Predicted 5 samples, 1 corrupt file(s) skipped" in out
