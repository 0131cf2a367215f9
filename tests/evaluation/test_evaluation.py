"""The Lightning evaluation end to end: main.py on the real config, DDP equals one process, drop-in callbacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import timm
import torch
import yaml
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ash_lightning.callbacks import ActivationShapingCallback, OODMetricsCallback
from ash_lightning.data import OODDataModule
from ash_lightning.evaluation.score_store import load_scores
from ash_lightning.models.backbone import create_backbone
from tests.conftest import REPO, run_main, tiny_config, write_npz
from tests.run_equality import assert_same_evaluation

METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out")


def _results(out: Path) -> dict:
    return json.loads((out / "run" / "v" / "ood_results.json").read_text())


def test_cifar10_config_runs_and_writes_json(shared_data: Path, tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "configs" / "cifar10_resnet20_ash_s.yaml").read_text())
    for spec in [config["data"]["id"], *config["data"]["ood"].values()]:
        spec["limit"] = 300
    config["data"].update(batch_size=128, num_workers=0)
    config["trainer"].update(
        enable_progress_bar=False,
        logger={
            "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(tmp_path), "name": "run", "version": "v"},
        },
    )
    proc = run_main(config, tmp_path, env={"DATASETS": str(shared_data)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(tmp_path)
    assert results["counts"] == {
        "cifar10": 300,
        "textures": 300,
        "mnist": 300,
        "fashionmnist": 300,
        "tinyimagenet": 300,
    }
    (run,) = results["runs"]
    assert (run["shaping"], run["score"]) == ("ash_s@90", "energy")
    assert set(run["ood"]) == {"textures", "mnist", "fashionmnist", "tinyimagenet"}
    for metrics in [*run["ood"].values(), run["mean"], *run["groups"].values()]:
        assert set(metrics) == set(METRICS) and all(0.0 <= v <= 1.0 for v in metrics.values())
    assert set(run["groups"]) == {"near", "far"}
    assert np.isclose(run["mean"]["auroc"], np.mean([m["auroc"] for m in run["ood"].values()]))
    # The real weights separate CIFAR-10 from MNIST far better than chance, and classify well above chance.
    assert run["ood"]["mnist"]["auroc"] > 0.8 and run["id_accuracy"] > 0.6
    assert results["config"]["model"]["backbone"] == "cifar_resnet20"
    assert "| **mean** |" in proc.stdout
    csv_lines = (tmp_path / "run" / "v" / "ood_results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 4 + 2 + 1


def test_ddp_two_processes_equal_one(tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """With calibrated shapers each DDP process fits them on data.fit (its own empty cache) as one process does; with
    rankfeat (the sweep's split point before the last stage); also with a covariate-shifted ID set of an odd size
    (DistributedSampler pads its shards)."""
    single, double = tmp_path / "one", tmp_path / "two"
    shaping = ["ash_s@90", "ash_b@65", "optfs", "bfact@95@2", "ras", "rankfeat"]
    csid = {"shifted": {"kind": "npz", "path": str(write_npz(tmp_path / "shifted.npz", 37, 3, 0.8))}}
    config = tiny_config(tiny_data, tiny_checkpoint, single, shaping=shaping, score=["energy", "msp"])
    config["data"]["fit"] = {"kind": "npz", "path": str(tiny_data["id"]), "limit": 40}
    config["data"]["csid"] = csid
    proc = run_main(config, tmp_path, env={"ASH_CACHE_DIR": str(single / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = tiny_config(tiny_data, tiny_checkpoint, double, shaping=shaping, score=["energy", "msp"])
    config["data"]["fit"] = {"kind": "npz", "path": str(tiny_data["id"]), "limit": 40}
    config["data"]["csid"] = csid
    ddp = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    proc = run_main(config, tmp_path, *ddp, env={"ASH_CACHE_DIR": str(double / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _results(single), _results(double)
    assert one["counts"] == two["counts"] == {"id": 101, "dark": 67, "bright": 53, "shifted": 37}
    assert two["config"]["trainer"]["world_size"] == 2
    store_two, _ = load_scores(str(double / "run" / "v"))
    for name in ("id", "dark", "bright", "shifted"):
        np.testing.assert_array_equal(store_two[name]["index"], np.arange(len(store_two[name]["index"])))
    assert_same_evaluation(single / "run" / "v", double / "run" / "v")


class PlainClassifier(pl.LightningModule):
    """A user's own module: not ours, it only knows its timm network and returns logits from test_step."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__()
        self.net = timm.create_model("cifar_resnet20")
        state = torch.load(checkpoint, weights_only=True)["state_dict"]
        self.net.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        x, _, _ = batch
        return self.net(x)


def test_callbacks_drop_into_a_plain_module(tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path) -> None:
    import ash_lightning.models  # noqa: F401  (registers cifar_resnet20 in timm)

    proc = run_main(tiny_config(tiny_data, tiny_checkpoint, tmp_path / "cli"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = _results(tmp_path / "cli")

    datamodule = OODDataModule(
        id={"kind": "npz", "path": str(tiny_data["id"])},
        ood={
            "dark": {"kind": "npz", "path": str(tiny_data["dark"])},
            "bright": {"kind": "npz", "path": str(tiny_data["bright"])},
        },
        backbone="cifar_resnet20",
        batch_size=16,
    )
    module = PlainClassifier(tiny_checkpoint)
    metrics = OODMetricsCallback(ood_names=["dark", "bright"], groups={"near": ["dark"], "far": ["bright"]})
    shaping = ActivationShapingCallback("ash_s@90")
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[shaping, metrics],
        enable_progress_bar=False,
        logger=TensorBoardLogger(str(tmp_path / "plain"), name="run", version="v"),
    )
    trainer.test(module, dataloaders=datamodule.test_dataloader())
    ours = metrics.results
    assert ours["counts"] == {"id": 101, "dark": 67, "bright": 53}
    (run,), (ref,) = ours["runs"], reference["runs"]
    assert run["shaping"] == "ash_s@90" and run["score"] == "energy"
    for name in ("dark", "bright"):
        for key in METRICS:
            assert run["ood"][name][key] == pytest.approx(ref["ood"][name][key], abs=1e-12)
    assert run["id_accuracy"] == pytest.approx(ref["id_accuracy"])
    # The hook is gone after testing: the plain network computes its unshaped logits again.
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(module.net(x), module.net.forward_head(module.net.forward_features(x)))
    assert not module.net.linear._forward_pre_hooks


def test_tensorboard_gets_scalars_histograms_and_figures(
    tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    proc = run_main(tiny_config(tiny_data, tiny_checkpoint, tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "run" / "v"), size_guidance={"histograms": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"ood/dark/fpr95", "ood/bright/auroc", "ood/mean/aupr_in", "ood/group_near/aupr_out", "id/accuracy"} <= set(
        tags["scalars"]
    )
    assert {"scores/id", "scores/dark", "scores/bright"} <= set(tags["histograms"])
    assert "curves/roc_pr" in tags["images"]
    results = _results(tmp_path)
    assert events.Scalars("ood/dark/fpr95")[0].value == pytest.approx(results["runs"][0]["ood"]["dark"]["fpr95"])


def test_module_test_step_returns_per_sample_outputs(tiny_checkpoint: Path) -> None:
    from ash_lightning.module import OODEvalModule

    module = OODEvalModule("cifar_resnet20", checkpoint_path=str(tiny_checkpoint), shaping="ash_p@80", score="msp")
    x = torch.rand(5, 3, 32, 32)
    out = module.test_step((x, torch.arange(5), torch.arange(10, 15)), 0)
    assert out["logits"].shape == (5, 10) and out["scores"].shape == (5,)
    assert torch.equal(out["index"], torch.arange(10, 15)) and torch.equal(out["targets"], torch.arange(5))
    net = create_backbone("cifar_resnet20", checkpoint_path=str(tiny_checkpoint))
    from ash_lightning import ash_p

    expected = net.linear(ash_p(net.forward_head(net.forward_features(x), pre_logits=True), 80))
    torch.testing.assert_close(out["logits"], expected)
    torch.testing.assert_close(out["scores"], torch.softmax(expected, 1).max(1).values)
