"""Dropping ash-lightning into a Lightning project that is not ours: a namespaced import next to the user's own
``callbacks.py``, either Lightning package (Trainer and LightningCLI), a torchvision classifier, dict batches,
calibration from a plain DataLoader, and the installed wheel's top-level names."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as lp
import numpy as np
import pytest
import pytorch_lightning as pl
import timm
import torch
import torchvision
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader

import ash_lightning.models  # noqa: F401  (registers cifar_resnet20)
from ash_lightning import ash_s
from ash_lightning.callbacks import ActivationShapingCallback, OODMetricsCallback
from ash_lightning.data import OODDataModule
from ash_lightning.errors import UserError
from ash_lightning.evaluation.score_store import load_scores
from tests.conftest import REPO, run_main, tiny_config
from tests.run_equality import SCORE_RTOL

USER_CALLBACKS = """
import lightning as L


class MarkTheEnd(L.Callback):
    def on_test_end(self, trainer, pl_module):
        print("the user's own callback ran")
"""

USER_TRAIN = '''
import lightning as L
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

from ash_lightning import ash_s
from ash_lightning.callbacks import ActivationShapingCallback, OODMetricsCallback
from callbacks import MarkTheEnd


class Images(Dataset):
    """{"image": x, "label": y} samples."""

    def __init__(self, n, shift, seed):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.rand(n, 3, 32, 32, generator=g) + shift, torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.loss = torch.nn.CrossEntropyLoss()          # an nn.Module without a classifier comes first
        self.model = torchvision.models.resnet18(num_classes=10)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        return self.model(batch["image"])


L.seed_everything(0)
sets = {"fit": Images(48, 0.0, 3), "id": Images(40, 0.0, 0), "far": Images(30, 1.0, 1)}
fit = DataLoader(sets["fit"], batch_size=16)
module = Classifier().eval()
trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir="out", enable_progress_bar=False,
                    callbacks=[MarkTheEnd(), ActivationShapingCallback("react@p90", fit_dataloader=lambda: fit),
                               OODMetricsCallback(ood_names=["far"])])
trainer.test(module, dataloaders=[DataLoader(sets["id"], batch_size=16), DataLoader(sets["far"], batch_size=16)])
torch.save({"state_dict": module.model.state_dict(), **{name: s.x for name, s in sets.items()}}, "check.pt")
'''


def test_a_user_project_with_its_own_callbacks_module(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "callbacks.py").write_text(USER_CALLBACKS)
    (project / "train.py").write_text(USER_TRAIN)
    proc = subprocess.run([sys.executable, "train.py"], cwd=project, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = project / "out"
    assert "the user's own callback ran" in proc.stdout
    assert f"no logger, so the results go to trainer.default_root_dir: {out}" in proc.stderr  # Lightning's log
    assert {"ood_results.json", "ood_results.csv", "scores.npz", "curves.png"} <= {p.name for p in out.iterdir()}
    results = json.loads((out / "ood_results.json").read_text())
    (run,) = results["runs"]
    assert (run["shaping"], run["score"]) == ("react@p90", "energy")
    assert run["id_accuracy"] is not None  # read from the dict batches' "label"
    # By hand: ReAct at the 90th percentile of the fit images' penultimate features (the input of fc), energy.
    saved = torch.load(project / "check.pt")
    net = torchvision.models.resnet18(num_classes=10).eval()
    net.load_state_dict(saved["state_dict"])
    fc, net.fc = net.fc, nn.Identity()
    with torch.no_grad():
        threshold = float(np.percentile(net(saved["fit"]).double().numpy(), 90))
        expected = torch.logsumexp(fc(net(saved["id"]).clamp(max=threshold)), dim=1)
    store, _ = load_scores(str(out))
    ours = store["id"]["scores"][np.argsort(store["id"]["index"])].reshape(-1)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_the_wheel_installs_only_ash_lightning(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a clean copy: no build/ folder left over from earlier builds
    shutil.copytree(REPO / "ash_lightning", source / "ash_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("ash_lightning-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["ash_lightning"]
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"ash_lightning"}
    assert {
        "ash_lightning/callbacks/__init__.py",
        "ash_lightning/callbacks/ood_metrics.py",
        "ash_lightning/lightning.py",
    } <= set(names)


LIGHTNING_CLI = """
from lightning.pytorch.cli import LightningCLI

from ash_lightning.lightning import OODDataModule, OODEvalModule

LightningCLI(OODEvalModule, OODDataModule)
"""


class PlainResNet(pl.LightningModule):
    """A user's module around cifar_resnet20 (no ash-lightning inside)."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__()
        self.net = timm.create_model("cifar_resnet20")
        state = torch.load(checkpoint, weights_only=True)["state_dict"]
        self.net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.net(batch[0])


def _scores(run_dir: Path) -> dict[str, np.ndarray]:
    store, _ = load_scores(str(run_dir))
    return {name: fields["scores"][np.argsort(fields["index"])] for name, fields in store.items()}


def test_both_lightning_clis_and_fit_dataloader_calibrate_alike(
    tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    """react@p90 fitted on data.fit by main.py (pytorch_lightning's LightningCLI), by lightning's LightningCLI with
    ash_lightning.lightning's classes, and by ActivationShapingCallback(fit_dataloader=...) on the same data."""
    monkeypatch.setenv("ASH_CACHE_DIR", str(tmp_path / "cache"))
    fit = {"kind": "npz", "path": str(tiny_data["id"]), "select": "0::2"}
    config = tiny_config(tiny_data, tiny_checkpoint, tmp_path / "classic", shaping="react@p90")
    config["data"]["fit"] = fit
    proc = run_main(config, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    classic = _scores(tmp_path / "classic" / "run" / "v")

    unified_config = {
        **config,
        "data": {**config["data"], "backbone": "cifar_resnet20"},
        "trainer": {
            **config["trainer"],
            "callbacks": [{"class_path": "ash_lightning.callbacks.OODMetricsCallback"}],
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "unified"), "name": "run", "version": "v"},
            },
        },
    }
    (tmp_path / "cli.py").write_text(LIGHTNING_CLI)
    (tmp_path / "unified.yaml").write_text(yaml.safe_dump(unified_config))
    proc = subprocess.run(
        [sys.executable, "cli.py", "test", "--config", "unified.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    unified = _scores(tmp_path / "unified" / "run" / "v")

    datamodule = OODDataModule(
        id=config["data"]["id"], ood=config["data"]["ood"], fit=fit, backbone="cifar_resnet20", batch_size=16
    )
    fit_loader = datamodule.fit_dataloader()  # a plain DataLoader over the same images
    metrics = OODMetricsCallback(ood_names=["dark", "bright"], output_dir=str(tmp_path / "plain"), log_figures=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ActivationShapingCallback("react@p90", fit_dataloader=fit_loader), metrics],
    )
    trainer.test(PlainResNet(tiny_checkpoint), dataloaders=datamodule.test_dataloader(), verbose=False)
    plain = _scores(tmp_path / "plain")

    assert set(classic) == set(unified) == set(plain) == {"id", "dark", "bright"}
    for name in classic:
        np.testing.assert_array_equal(unified[name], classic[name])
        # in-process vs subprocess: other thread counts reorder float32 sums (tolerance: tests/run_equality.py)
        tolerance = SCORE_RTOL * np.abs(classic[name]).max()
        np.testing.assert_allclose(plain[name].reshape(-1), classic[name].reshape(-1), rtol=0, atol=tolerance)


class TwoChildren(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.metric = nn.MSELoss()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())  # no classifier
        self.backbone = torchvision.models.resnet18(num_classes=10)


class Flat(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 2, 5), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x.view(len(x), 1, 12)))


def test_the_network_is_the_first_child_with_a_classifier() -> None:
    trainer = SimpleNamespace(datamodule=None)
    module = TwoChildren()
    callback = ActivationShapingCallback("ash_s@90")
    callback.on_test_start(trainer, module)
    assert callback._handle.module is module.backbone.fc
    callback.on_test_end(trainer, module)
    flat = Flat()  # no child holds a classifier (a lone nn.Linear is not a network): the module's last nn.Linear
    callback.on_test_start(trainer, flat)
    assert callback._handle.module is flat.head
    x = torch.rand(2, 12)
    features = ash_s(flat.body(x.view(2, 1, 12)), 90)
    torch.testing.assert_close(flat(x), nn.functional.linear(features, flat.head.weight, flat.head.bias))
    callback.on_test_end(trainer, flat)
    assert not flat.head._forward_pre_hooks and not module.backbone.fc._forward_pre_hooks


def test_missing_fit_data_names_the_two_ways_to_give_it() -> None:
    callback = ActivationShapingCallback("react@p90")
    with pytest.raises(UserError, match=r"react@p90 needs ID statistics.*fit_dataloader=.*calibrate\(") as err:
        callback.on_test_start(SimpleNamespace(datamodule=None), Flat())
    assert "data.fit" not in str(err.value)


class ScoresOnly(lp.LightningModule):
    """Returns its own scores from dict batches whose keys carry no label name; ``runs`` makes it a sweep."""

    def __init__(self, runs: list[dict[str, str]] | None = None) -> None:
        super().__init__()
        self.head = nn.Linear(12, 4)
        self.runs = runs

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        scores = torch.logsumexp(self.head(batch["pixels"]), dim=1)
        return {"scores": torch.stack([scores, 2 * scores], dim=1) if self.runs else scores}


def _dict_loaders() -> list[DataLoader]:
    torch.manual_seed(0)
    return [
        DataLoader([{"pixels": x, "tag": 0} for x in torch.randn(n, 12) + shift], batch_size=8)
        for n, shift in ((24, 0.0), (20, 1.0))
    ]


def test_scores_from_test_step_and_unreadable_labels(tmp_path: Path, lightning_log: list[str]) -> None:
    metrics = OODMetricsCallback(ood_names=["far"])
    trainer = lp.Trainer(
        accelerator="cpu",
        logger=False,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[metrics],
    )
    with pytest.warns(
        UserWarning, match=r"cannot read labels .*a dict with keys \['pixels', 'tag'\].*id_accuracy"
    ) as caught:
        trainer.test(ScoresOnly(), dataloaders=_dict_loaders(), verbose=False)
    assert sum("cannot read labels" in str(w.message) for w in caught) == 1  # once, not per batch
    (run,) = metrics.results["runs"]
    assert (run["shaping"], run["score"]) == ("none", "scores from test_step") and run["id_accuracy"] is None
    logged = "\n".join(lightning_log)
    assert "### none + scores from test_step" in logged and str(tmp_path) in logged and logged.endswith("scores.npz")
    assert metrics.summary is not None and metrics.summary in logged
    assert {"ood_results.json", "scores.npz", "curves.png"} <= {p.name for p in tmp_path.iterdir()}


def test_figures_are_files_whatever_the_logger(tmp_path: Path) -> None:
    runs = [{"shaping": "ash_s@80", "score": "energy"}, {"shaping": "ash_s@90", "score": "energy"}]
    trainer = lp.Trainer(
        accelerator="cpu",
        logger=lp.loggers.CSVLogger(str(tmp_path), name="csv", version="v"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[OODMetricsCallback(ood_names=["far"])],
    )
    with pytest.warns(UserWarning, match="cannot read labels"):
        trainer.test(ScoresOnly(runs), dataloaders=_dict_loaders(), verbose=False)
    run_dir = tmp_path / "csv" / "v"
    assert {"sweep.png", "curves.png", "ood_results.json", "metrics.csv"} <= {p.name for p in run_dir.iterdir()}
    assert "ash_s@80|energy/ood/mean/auroc" in (run_dir / "metrics.csv").read_text().splitlines()[0]


def test_state_dict_round_trip_keeps_the_results(tmp_path: Path) -> None:
    metrics = OODMetricsCallback(ood_names=["far"], output_dir=str(tmp_path), log_figures=False, verbose=False)
    assert metrics.state_dict() == {"results": None}
    trainer = lp.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[metrics]
    )
    with pytest.warns(UserWarning, match="cannot read labels"):
        trainer.test(ScoresOnly(), dataloaders=_dict_loaders(), verbose=False)
    torch.save(metrics.state_dict(), tmp_path / "state.pt")
    restored = OODMetricsCallback()
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    assert restored.results == metrics.results and restored.results["runs"][0]["ood"]["far"]["auroc"] >= 0
    assert json.loads((tmp_path / "ood_results.json").read_text())["counts"] == restored.results["counts"]
