"""The callbacks in-process: sweeps from one backbone pass, OOD sets on the callback, the user errors and their
fixes, hyper-parameters of every kind in the files, and ``OODDataModule`` without a backbone."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as lp
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ash_lightning.callbacks import ActivationShapingCallback, OODMetricsCallback
from ash_lightning.data import OODDataModule
from ash_lightning.errors import UserError
from ash_lightning.evaluation.metrics import ood_metrics
from ash_lightning.evaluation.score_store import load_scores
from tests.conftest import REPO


class Pairs(Dataset):
    """(x, y) samples of 12 features."""

    def __init__(self, n: int, shift: float, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 12, generator=g) + shift, torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


class User(lp.LightningModule):
    """A user's module: test_step logs its own accuracy and returns nothing."""

    def __init__(self, **hparams: object) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/acc", (self(x).argmax(1) == y).float().mean())


class MultiLoader(User):
    """Today's form: several test dataloaders, ``dataloader_idx`` in test_step, logits returned."""

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(batch[0])


def _test(module: lp.LightningModule, callbacks: list, loaders: object) -> lp.Trainer:
    trainer = lp.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks
    )
    trainer.test(module, loaders, verbose=False)
    return trainer


FIT = DataLoader(Pairs(21, 0.0, 5), batch_size=7)  # batches of 7: told apart from the test batches below
SWEEP = ["none", "ash_s@90", "react@p90", "scale@85", "optfs", "bfact@95@2", "ras"]


def _metrics(tmp_path: Path, name: str) -> OODMetricsCallback:
    return OODMetricsCallback(
        ood={"far": Pairs(13, 2.0, 1)},
        score=["energy", "knn@5"],
        fit_dataloader=FIT,
        batch_size=8,
        output_dir=str(tmp_path / name),
        log_figures=False,
        verbose=False,
    )


def test_a_sweep_from_the_callbacks_is_one_backbone_pass_per_batch_and_equals_each_setting_alone(
    tmp_path: Path,
) -> None:
    module, passes = User(), []
    module.net[0].register_forward_hook(lambda m, args, out: passes.append(len(args[0])))
    id_loader = DataLoader(Pairs(20, 0.0, 0), batch_size=8)
    metrics = _metrics(tmp_path, "sweep")
    trainer = _test(module, [ActivationShapingCallback(SWEEP, fit_dataloader=FIT), metrics], id_loader)
    assert [n for n in passes if n != 7] == [8, 8, 4, 8, 5]  # the ID batches, then the OOD set's: once each
    runs = metrics.results["runs"]
    assert [(r["shaping"], r["score"]) for r in runs] == [(s, c) for s in SWEEP for c in ("energy", "knn@5")]
    settings = 2 * len(SWEEP)
    assert len(metrics.results["ranking"]) == settings and f"All {settings} settings, ranked" in metrics.summary
    assert all(f" | {s} | {c} | " in metrics.summary for s in SWEEP for c in ("energy", "knn@5"))
    # nothing is attached while the user's loop runs: their accuracy is the unshaped network's
    assert float(trainer.callback_metrics["test/acc"]) == pytest.approx(runs[0]["id_accuracy"])
    sweep, _ = load_scores(str(tmp_path / "sweep"))
    for s, spec in enumerate(SWEEP):
        one = _metrics(tmp_path, spec)
        _test(User(), [ActivationShapingCallback(spec, fit_dataloader=FIT), one], id_loader)
        alone, _ = load_scores(str(tmp_path / spec))
        for name in ("id", "far"):
            np.testing.assert_allclose(
                sweep[name]["scores"][:, 2 * s : 2 * s + 2], alone[name]["scores"], rtol=1e-5, atol=1e-5
            )
        assert one.results["runs"][0]["id_accuracy"] == runs[2 * s]["id_accuracy"]


def test_csid_sets_on_the_callback_are_scored_like_ood_sets_and_count_as_id_in_the_full_spectrum_results(
    tmp_path: Path,
) -> None:
    id_loader = DataLoader(Pairs(20, 0.0, 0), batch_size=8)
    far, shifted = Pairs(13, 2.0, 1), Pairs(11, 0.5, 2)
    stores, results = {}, {}
    for name, sets in (
        ("csid", {"ood": {"far": far}, "csid": {"shifted": shifted}}),
        ("as_ood", {"ood": {"far": far, "shifted": shifted}}),
    ):
        metrics = OODMetricsCallback(
            **sets,
            score=["energy", "knn@5"],
            fit_dataloader=FIT,
            batch_size=8,
            output_dir=str(tmp_path / name),
            log_figures=False,
            verbose=False,
        )
        _test(User(), [ActivationShapingCallback(["none", "ash_s@90"], fit_dataloader=FIT), metrics], id_loader)
        stores[name], _ = load_scores(str(tmp_path / name))
        results[name] = metrics.results
    assert results["csid"]["csid_sets"] == ["shifted"]
    assert results["csid"]["counts"] == {"id": 20, "far": 13, "shifted": 11}
    for field in ("scores", "index", "targets", "preds"):
        np.testing.assert_array_equal(stores["csid"]["shifted"][field], stores["as_ood"]["shifted"][field])
    store = stores["csid"]
    for r, run in enumerate(results["csid"]["runs"]):
        assert set(run["ood"]) == {"far"} and run["ood"]["far"] == results["as_ood"]["runs"][r]["ood"]["far"]
        as_id = np.concatenate([store["id"]["scores"][:, r], store["shifted"]["scores"][:, r]])
        assert run["fsood"]["ood"]["far"] == ood_metrics(as_id, store["far"]["scores"][:, r])
        hand = np.mean(store["shifted"]["preds"][:, r] == store["shifted"]["targets"])
        assert run["fsood"]["csid_accuracy"] == {"shifted": pytest.approx(hand)}
    with pytest.raises(UserError, match=r"csid=\['shifted'\]\) scores the csid sets after the OOD sets of ood="):
        OODMetricsCallback(csid={"shifted": shifted})
    with pytest.raises(UserError, match=r"\['far'\] named in csid= and in ood="):
        OODMetricsCallback(ood={"far": far}, csid={"far": shifted})


class NoImages(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[str, int]:
        return "a caption", 0


class Features(lp.LightningModule):
    """``body`` gives feature maps, ``net`` the logits; test_step runs ``forward``, or ``other`` only."""

    def __init__(self, calls_forward: bool = True) -> None:
        super().__init__()
        self.calls_forward = calls_forward
        self.body = nn.Conv1d(1, 2, 3)
        self.net = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
        self.other = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        self.body(x[:, None])
        return self.net(x)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch[0]) if self.calls_forward else self.other(batch[0])
        return nn.functional.cross_entropy(logits, batch[1])


def _id() -> DataLoader:
    return DataLoader(Pairs(10, 0.0, 0), batch_size=4)


@pytest.mark.parametrize(
    "module, metrics, loaders, message",
    [
        (
            MultiLoader,
            lambda: OODMetricsCallback(ood_names=["a", "b"]),
            lambda: [_id(), _id()],
            r"has 2 names for 1 OOD test dataloaders\. Fix: give one name per test dataloader after the ID one",
        ),
        (
            MultiLoader,
            lambda: OODMetricsCallback(ood={"far": Pairs(5, 1.0, 1)}),
            lambda: [_id(), _id()],
            r"ood=\['far'\]\) scores the OOD sets itself, but the test loop has 2 test dataloaders\. Fix: give "
            r"either ood= .* or the OOD sets as extra test dataloaders",
        ),
        (
            User,
            lambda: OODMetricsCallback(ood={"stored": "npz:unused.npz"}),
            lambda: _id(),
            r"a data spec is read as images and needs a transform.*Fix: pass OODMetricsCallback\(transform=",
        ),
        (
            User,
            lambda: OODMetricsCallback(ood={"captions": NoImages()}),
            lambda: _id(),
            r"the items of OOD set 'captions' hold no image tensor \(a list of 2 items\)\. Fix: make them",
        ),
        (
            lambda: Features(calls_forward=False),
            lambda: OODMetricsCallback(),
            lambda: _id(),
            r"a forward hook on Sequential, but Sequential did not run in test_step\. Fix: pass "
            r"OODMetricsCallback\(module=",
        ),
        (
            Features,
            lambda: OODMetricsCallback(module="body", ood={"far": Pairs(5, 1.0, 1)}),
            lambda: _id(),
            r"reads the logits from Conv1d's forward, but it gave a tensor of shape \(4, 2, 10\), not logits "
            r"\(B, classes\)\. Fix: pass OODMetricsCallback\(module=",
        ),
    ],
    ids=["ood_names_count", "ood_and_extra_loaders", "spec_without_transform", "no_image", "no_network", "no_logits"],
)
def test_user_errors_name_their_fix(tmp_path: Path, module, metrics, loaders, message: str) -> None:
    callback = metrics()
    callback.output_dir, callback.log_figures = str(tmp_path), False
    with pytest.raises(UserError, match=message) as raised:
        _test(module(), [callback], loaders())
    assert "\n" not in str(raised.value)


def test_a_user_error_ends_a_users_script_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    script = (
        "import lightning.pytorch as lp\n"
        "from tests.callbacks.test_callback_forms import MultiLoader, _id\n"
        "from ash_lightning.callbacks import OODMetricsCallback\n"
        "trainer = lp.Trainer(accelerator='cpu', logger=False, enable_progress_bar=False,\n"
        "                     callbacks=[OODMetricsCallback(ood_names=['a', 'b'])])\n"
        "trainer.test(MultiLoader(), [_id(), _id()])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("UserError:")]
    assert "Fix: give one name per test dataloader" in line


def test_hyper_parameters_of_any_kind_are_recorded_in_their_string_form(tmp_path: Path) -> None:
    hparams = {
        "net": nn.Linear(2, 2),
        "optimizer": functools.partial(torch.optim.SGD, lr=0.1),
        "config": OmegaConf.create({"a": 1}),
        "tags": OmegaConf.create(["x"]),
        "root": tmp_path,
        "dtype": torch.bfloat16,
        "plain": {"depth": 3, "nested": [1.5, None, True]},
    }
    metrics = OODMetricsCallback(ood={"far": Pairs(6, 2.0, 1)}, output_dir=str(tmp_path), log_figures=False)
    _test(User(**hparams), [metrics], _id())
    _, meta = load_scores(str(tmp_path))
    written = json.loads((tmp_path / "ood_results.json").read_text())["config"]["model"]
    assert (
        meta["config"]["model"]
        == written
        == {
            "net": "Linear(in_features=2, out_features=2, bias=True)",
            "optimizer": str(hparams["optimizer"]),
            "config": "{'a': 1}",
            "tags": "['x']",
            "root": str(tmp_path),
            "dtype": "torch.bfloat16",
            "plain": {"depth": 3, "nested": [1.5, None, True]},
        }
    )


def test_data_module_without_backbone_builds_its_transform_from_the_options(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", x=pixels, y=np.zeros(6, dtype=np.int64))
    spec = {"kind": "npz", "path": str(tmp_path / "set.npz")}
    options = {"image_size": 8, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 1.0}
    data = OODDataModule(id=spec, ood={"same": spec}, **options)
    x, _, _ = next(iter(data.test_dataloader()[0]))
    expected = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    with pytest.raises(
        UserError, match=r"data.backbone is not set.*mean, std, crop_pct are missing\. Fix: set data\.mean"
    ):
        OODDataModule(id=spec, ood={"same": spec}, image_size=8)


class Both(User):
    """Takes ``dataloader_idx`` (so that today's form works too) and returns nothing."""

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self(batch[0])


def test_ood_on_the_callback_scores_as_the_test_loop_does_at_the_trainers_precision(tmp_path: Path) -> None:
    """The same OOD set through the test loop (today's form) and through ood= gives the same scores under
    bf16-mixed autocast with ash_s@90 attached; at float32 they differ (the callback uses the trainer's precision)."""
    far = Pairs(13, 2.0, 1)
    stores = {}
    for name, precision, ood in (
        ("loop", "bf16-mixed", None),
        ("callback", "bf16-mixed", {"far": far}),
        ("float32", "32-true", {"far": far}),
    ):
        metrics = OODMetricsCallback(
            ood=ood, ood_names=None if ood else ["far"], output_dir=str(tmp_path / name), log_figures=False
        )
        trainer = lp.Trainer(
            accelerator="cpu",
            precision=precision,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[ActivationShapingCallback("ash_s@90"), metrics],
        )
        loaders = [_id(), DataLoader(far, batch_size=4)] if ood is None else _id()
        trainer.test(Both(), loaders, verbose=False)
        stores[name], _ = load_scores(str(tmp_path / name))
    for field in ("scores", "index", "targets"):
        np.testing.assert_array_equal(stores["loop"]["far"][field], stores["callback"]["far"][field])
    assert not np.allclose(stores["float32"]["far"]["scores"], stores["callback"]["far"]["scores"], rtol=0, atol=1e-6)


class Transformed(Dataset):
    """The ID data as images through its own ``transform`` attribute (a torchvision-style dataset)."""

    def __init__(self, pixels: np.ndarray) -> None:
        from torchvision.transforms import ToTensor

        self.pixels, self.transform = pixels, ToTensor()

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.pixels[i])), 0


class Conv(lp.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.net(batch[0])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def test_a_spec_reuses_the_id_transform_through_subset_and_concat(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (10, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "ood.npz", x=pixels[:5], y=np.zeros(5, dtype=np.int64))
    id_set = torch.utils.data.ConcatDataset([torch.utils.data.Subset(Transformed(pixels), range(8))])
    metrics = OODMetricsCallback(
        ood={"same": f"npz:{tmp_path / 'ood.npz'}"}, output_dir=str(tmp_path), log_figures=False
    )
    _test(Conv(), [metrics], DataLoader(id_set, batch_size=4))
    store, _ = load_scores(str(tmp_path))
    np.testing.assert_allclose(store["same"]["scores"], store["id"]["scores"][:5], rtol=1e-6, atol=1e-6)
