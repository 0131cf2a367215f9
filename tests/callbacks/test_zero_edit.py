"""OOD evaluation added to a user's Lightning project by configuration alone: the Hydra template kind and the
LightningCLI kind (``tests/callbacks/user_projects.py``), each run in a subprocess under both Lightning packages
and checked against the shaping and the energy written out here; DDP with 2 CPU processes against one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ash_lightning.evaluation.score_store import load_scores
from tests.callbacks.user_projects import (
    CLI_MAIN,
    CLI_MODEL,
    HYDRA_CONFIGS,
    HYDRA_DATA,
    HYDRA_EVAL,
    HYDRA_MODELS,
    write_project,
)
from tests.conftest import REPO
from tests.run_equality import assert_same_evaluation

PACKAGES = ("lightning", "pytorch_lightning")


def _run(folder: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}
    return subprocess.run([sys.executable, *args], cwd=folder, capture_output=True, text=True, timeout=timeout, env=env)


def _sorted_scores(run_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    store, _ = load_scores(str(run_dir))
    return {name: {k: v[np.argsort(fields["index"])] for k, v in fields.items()} for name, fields in store.items()}


def ash_s_by_hand(h: torch.Tensor, percentile: float) -> torch.Tensor:
    """ASH-S written out: keep the k = n - round(n p / 100) largest values of each row, zero the rest, and
    multiply what is kept by exp(sum of the row / sum of what is kept)."""
    k = h.shape[1] - round(h.shape[1] * percentile / 100)
    top = h.topk(k, dim=1)
    kept = torch.zeros_like(h).scatter(1, top.indices, top.values)
    return kept * torch.exp(h.sum(1) / top.values.sum(1))[:, None]


def energy_by_hand(logits: torch.Tensor) -> torch.Tensor:
    """The energy score written out: log sum_k exp(logit_k), stabilised by the row maximum."""
    m = logits.max(dim=1, keepdim=True).values
    return (m + torch.log(torch.exp(logits - m).sum(dim=1, keepdim=True)))[:, 0]


def gray_digits(n: int, shift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The project's ``GrayDigits`` data, as its code draws it."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) + shift, torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("package", PACKAGES)
def test_hydra_template_project_gets_ood_metrics_from_a_callbacks_config(tmp_path: Path, package: str) -> None:
    """The template's eval script ignores its callbacks config; `+callbacks=ood` and handing them to the trainer
    on the command line is all it takes. Datasets and the transform are nested `_target_`s; a data spec's RGB
    images reach the one-channel network as one channel."""
    gray = np.random.default_rng(0).integers(0, 256, (12, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "stored.npz", x=gray, y=np.zeros(12, dtype=np.int64))
    configs = {f"configs/{k}": v.replace("NPZ_PATH", str(tmp_path / "stored.npz")) for k, v in HYDRA_CONFIGS.items()}
    write_project(
        tmp_path, {"models.py": HYDRA_MODELS, "data.py": HYDRA_DATA, "eval.py": HYDRA_EVAL, **configs}, package
    )
    proc = _run(tmp_path, "eval.py", "+callbacks=ood", "+trainer.callbacks=${oc.dict.values:callbacks}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    state = torch.load(tmp_path / "net.pt", weights_only=True)
    (w1, b1), (w2, b2) = (
        (state["model.0.weight"], state["model.0.bias"]),
        (state["model.2.weight"], state["model.2.bias"]),
    )
    sets = {
        "id": gray_digits(40, 0.0, 0),
        "shifted": gray_digits(30, 1.5, 1),
        "stored": (torch.from_numpy(gray).float()[:, None] / 255, torch.zeros(12, dtype=torch.long)),
    }
    ours = _sorted_scores(tmp_path / "ood")
    assert set(ours) == set(sets)
    for name, (x, y) in sets.items():
        logits = ash_s_by_hand(torch.relu(x.flatten(1) @ w1.T + b1), 90) @ w2.T + b2
        np.testing.assert_allclose(ours[name]["scores"][:, 0], energy_by_hand(logits).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ours[name]["index"], np.arange(len(x)))
        if name == "id":
            accuracy = float((logits.argmax(1) == y).float().mean())

    results = json.loads((tmp_path / "ood" / "ood_results.json").read_text())
    (run,) = results["runs"]
    assert (run["shaping"], run["score"]) == ("ash_s@90", "energy")
    assert run["id_accuracy"] == pytest.approx(accuracy)
    user = eval(proc.stdout.split("USER METRICS", 1)[1].strip().splitlines()[0])  # the user's own logged metrics
    assert set(user) == {"test/loss", "test/acc"}  # the ID set's alone: no dataloader_idx_1
    assert user["test/acc"] == pytest.approx(accuracy)  # computed with the shaping attached (the README says so)
    assert "ash_s@90 is attached to SimpleDenseNet while testing" in proc.stderr
    model = results["config"]["model"]  # save_hyperparameters held a module, a partial and a ListConfig
    assert model["net"].startswith("SimpleDenseNet(") and "torch.optim.adam.Adam" in model["optimizer"]
    assert model["tags"] == "['dev', 'ood']"
    assert results["config"]["callback"]["ood"] == {
        "shifted": "data.GrayDigits, 30 samples",
        "stored": f"npz:{tmp_path / 'stored.npz'}",
    }
    # the trainer's bar (tqdm, or rich when installed) on a log: one line per OOD set, all its batches counted
    lines = re.split(r"[\r\n]", proc.stdout + proc.stderr)
    for name in ("shifted", "stored"):
        ours = [line for line in lines if line.startswith(f"OOD {name}:")]
        assert len(ours) == 1 and re.match(rf"OOD {name}: (\d+)/\1 batches in ", ours[0]), lines[-40:]


def _image_folder(folder: Path, classes: list[str], per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in classes:
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")


def _cli_by_hand(folder: Path, package: str, images: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The energy of ash_s@80 logits of the project's network as LightningCLI seeds and builds it."""
    code = (
        "import sys, torch\n"
        f"import {'lightning as L' if package == 'lightning' else 'pytorch_lightning as L'}\n"
        "from model import ImageNetLightningModel\n"
        "L.seed_everything(0)\n"
        "torch.save(ImageNetLightningModel('id').model.state_dict(), 'net.pt')\n"
    )
    (folder / "weights.py").write_text(code)
    proc = _run(folder, "weights.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(6, 3),
    )
    net.load_state_dict(torch.load(folder / "net.pt", weights_only=True))
    with torch.no_grad():
        return {name: energy_by_hand(net[4](ash_s_by_hand(net[:4](x), 80))).numpy() for name, x in images.items()}


def _folder_images(folder: Path) -> torch.Tensor:
    """The images of an ImageFolder/folder set in file order, through the ID transform written out: centre crop
    10 -> 8 (offset 1), to [0, 1], normalised by mean 0.5 and std 0.25."""
    paths = sorted(p for p in folder.rglob("*.png"))
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"))[1:9, 1:9] for p in paths])
    return (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25


@pytest.mark.parametrize("package", PACKAGES)
def test_lightning_cli_project_gets_ood_metrics_from_flags_or_a_class_path_yaml(tmp_path: Path, package: str) -> None:
    """The ImageNet-example kind: test_step returns the loss, loaders are built in the module, no data module.
    With lightning the callbacks come from `--trainer.callbacks+=` flags, with pytorch_lightning from a YAML whose
    OOD Dataset is a class_path; the folder spec reuses the ID ImageFolder's own transform."""
    _image_folder(tmp_path / "id", ["a", "b", "c"], 4, 0)
    _image_folder(tmp_path / "ood", ["x"], 6, 1)
    write_project(tmp_path, {"model.py": CLI_MODEL, "main.py": CLI_MAIN}, package)
    common = ["main.py", "test", "--model.data_path=id", "--trainer.logger=false", "--trainer.accelerator=cpu"]
    if package == "lightning":
        flags = [
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=ash_lightning.callbacks.OODMetricsCallback",
            '--trainer.callbacks.ood={"pngs": "folder:ood"}',
            "--trainer.callbacks.output_dir=results",
            "--trainer.callbacks.log_figures=false",
            "--trainer.callbacks+=ash_lightning.callbacks.ActivationShapingCallback",
            "--trainer.callbacks.spec=ash_s@80",
        ]
        proc = _run(tmp_path, *common, *flags)
    else:
        config = """
trainer:
  enable_progress_bar: false
  callbacks:
    - class_path: ash_lightning.callbacks.OODMetricsCallback
      init_args:
        output_dir: results
        log_figures: false
        ood:
          pngs: folder:ood
          noise:
            class_path: model.Noise
            init_args: {n: 9, seed: 3}
    - class_path: ash_lightning.callbacks.ActivationShapingCallback
      init_args: {spec: ash_s@80}
"""
        (tmp_path / "ood.yaml").write_text(config)
        proc = _run(tmp_path, *common, "--config", "ood.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = {"id": _folder_images(tmp_path / "id"), "pngs": _folder_images(tmp_path / "ood")}
    if package == "pytorch_lightning":
        images["noise"] = torch.randn(9, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = _cli_by_hand(tmp_path, package, images)
    ours = _sorted_scores(tmp_path / "results")
    assert set(ours) == set(expected)
    for name, scores in expected.items():
        np.testing.assert_allclose(ours[name]["scores"][:, 0], scores, rtol=1e-5, atol=1e-5)
    recorded = json.loads((tmp_path / "results" / "ood_results.json").read_text())["config"]["callback"]["ood"]
    assert recorded["pngs"] == "folder:ood"
    if package == "pytorch_lightning":
        assert recorded["noise"] == "model.Noise, 9 samples"


DDP_PROJECT = '''
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ash_lightning.callbacks import ActivationShapingCallback, OODMetricsCallback


class Indexed(Dataset):
    """(x, y, index) samples, so that DistributedSampler's padded repeats are counted once."""

    def __init__(self, n, shift, seed):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 12, generator=g) + shift, torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


class Plain(Dataset):
    def __init__(self, n, shift, seed):
        self.x = torch.randn(n, 12, generator=torch.Generator().manual_seed(seed)) + shift

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], -1


class User(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def test_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("test/loss", torch.nn.functional.cross_entropy(self(x), y), sync_dist=True)


if __name__ == "__main__":
    out, devices = sys.argv[1], int(sys.argv[2])
    fit = DataLoader(Indexed(40, 0.0, 5), batch_size=16)
    callbacks = [
        ActivationShapingCallback(["none", "ash_s@90", "react@p90"], fit_dataloader=fit),
        OODMetricsCallback(
            ood={"far": Plain(25, 2.0, 1), "near": Plain(19, 0.5, 2), "single": Plain(1, 1.0, 3)},
            score=["energy", "knn@5"],
            fit_dataloader=fit,
            batch_size=4,
            output_dir=out,
            log_figures=False,
        ),
    ]
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.test(User(), DataLoader(Indexed(33, 0.0, 0), batch_size=8), verbose=False)
'''


def test_ddp_two_processes_equal_one(tmp_path: Path) -> None:
    """OOD sets sharded by the callback (25 and 19 samples: uneven shards; 1 sample: a rank with none of its
    own), a sweep of 3 settings with a
    calibrated one and a fitted detector: 2 CPU processes give what one gives."""
    (tmp_path / "project.py").write_text(DDP_PROJECT)
    for name, devices in (("one", "1"), ("two", "2")):
        proc = _run(tmp_path, "project.py", str(tmp_path / name), devices)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_evaluation(tmp_path / "one", tmp_path / "two")
    counts = json.loads((tmp_path / "two" / "ood_results.json").read_text())["counts"]
    assert counts == {"id": 33, "far": 25, "near": 19, "single": 1}
