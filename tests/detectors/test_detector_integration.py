"""Detectors wired in: OODEvalModule's sweep, the fit cache, OODMetricsCallback, the functional API, main.py, DDP.

The references are the pure detector functions of ``ash_lightning.detectors`` on features and logits taken by a
plain forward pass of the same network with the shaping attached.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import ash_lightning.detectors.fitting as detector_fitting
from ash_lightning import attach_shaping, get_shaping
from ash_lightning._cache import network_identity
from ash_lightning.callbacks import ActivationShapingCallback, OODMetricsCallback
from ash_lightning.data.fit_pass import FitPass
from ash_lightning.detectors import ODIN, AdaScale, FeaturesAndLogits, FittedDetector, parse_detector
from ash_lightning.detectors.fitting import FitSettings, fit_detector, fit_detectors
from ash_lightning.detectors.scoring import detector_scores
from ash_lightning.errors import UserError
from ash_lightning.evaluation.score_store import load_scores
from ash_lightning.module import OODEvalModule
from ash_lightning.shaping.calibration import make_cache_key
from tests.conftest import main_in_process, run_main, tiny_config
from tests.run_equality import assert_same_evaluation

SPECS = ["mds", "rmds", "knn@5", "knn@5@0.5", "vim@4", "fdbd", "nnguide@5", "gradnorm", "odin@1000@0.0014", "adascale"]
# the newer detectors; tests/detectors/test_posthoc_baselines.py checks them against their authors' code
NEWER = ["she", "klm", "residual@8", "nci", "neco", "neco@3", "mdspp", "cadref", "caref"]
SHAPINGS = ["none", "ash_s@90"]


def _tensors(n: int, seed: int, shift: float = 0.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g) + shift, torch.randint(0, 10, (n,), generator=g)


def _loader(x: Tensor, y: Tensor, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(x, y, torch.arange(len(x))), batch_size=batch_size)


FIT = _tensors(48, 0)
TEST = [_tensors(21, 1), _tensors(19, 2, 1.5)]


class TinyData(pl.LightningDataModule):
    """Two test sets and labelled fit data, as tensors."""

    def test_dataloader(self) -> list[DataLoader]:
        return [_loader(*t) for t in TEST]

    def fit_dataloader(self) -> DataLoader:
        return _loader(*FIT)


class Collect(pl.Callback):
    """test_step's scores per dataloader."""

    def __init__(self) -> None:
        self.scores: dict[int, list[Tensor]] = {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.scores.setdefault(dataloader_idx, []).append(outputs["scores"].reshape(len(outputs["scores"]), -1))

    def result(self) -> Tensor:
        return torch.cat([torch.cat(self.scores[i]) for i in sorted(self.scores)])


def _module(shaping: list[str] | str, score: list[str] | str) -> OODEvalModule:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        return OODEvalModule("cifar_resnet20", shaping=shaping, score=score)


def _test(module: OODEvalModule, datamodule: pl.LightningDataModule | None = None) -> Tensor:
    collect = Collect()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[collect])
    trainer.test(module, datamodule=datamodule or TinyData(), verbose=False)
    return collect.result()


def _reference(model: nn.Module, spec: str, shaping: str, std: tuple[float, ...]) -> Tensor:
    """The pure detector on a plain forward pass of ``model`` with ``shaping`` attached, fit data in one batch."""
    detector = parse_detector(spec)
    classifier = model.get_classifier()
    weight, bias = classifier.weight.detach(), classifier.bias.detach()
    fit_x, fit_y = FIT
    test_x = torch.cat([x for x, _ in TEST])
    with attach_shaping(model, get_shaping(shaping)):
        forward = FeaturesAndLogits(model)
        if isinstance(detector, ODIN):
            return detector.score(model, test_x, std)
        if isinstance(detector, AdaScale):
            return detector.fit(detector.fit_shifts(forward, fit_x)).score(forward, test_x, weight, bias)
        with torch.no_grad():
            fit_features, fit_logits = forward(fit_x)
            features, logits = forward(test_x)
        return detector.fit(fit_features, fit_logits, fit_y, weight, bias).score(features, logits)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[OODEvalModule, Tensor]:
    """Every detector with energy, under two shapings, in one test run."""
    os.environ["ASH_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))  # no cache key here: nothing written
    module = _module(SHAPINGS, ["energy", *SPECS, *NEWER])
    return module, _test(module)


def test_sweep_runs_every_shaping_times_every_score(sweep: tuple[OODEvalModule, Tensor]) -> None:
    module, scores = sweep
    names = ["energy", *(parse_detector(spec).spec for spec in [*SPECS, *NEWER])]  # odin@1000@0.0014 -> odin
    assert "odin" in names
    assert [(r["shaping"], r["score"]) for r in module.runs] == [(s, c) for s in SHAPINGS for c in names]
    assert scores.shape == (40, len(module.runs)) and torch.isfinite(scores).all()


@pytest.mark.parametrize("spec", [*SPECS, *NEWER])
def test_sweep_detector_equals_pure_function(sweep: tuple[OODEvalModule, Tensor], spec: str) -> None:
    module, scores = sweep
    for shaping in SHAPINGS:
        column = [(r["shaping"], r["score"]) for r in module.runs].index((shaping, parse_detector(spec).spec))
        expected = _reference(module.model, spec, shaping, module._std)
        torch.testing.assert_close(scores[:, column], expected.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", [*SPECS, *NEWER])
def test_detector_alone_equals_its_sweep_column(sweep: tuple[OODEvalModule, Tensor], spec: str) -> None:
    module, scores = sweep
    alone = _test(_module("ash_s@90", spec))
    column = [(r["shaping"], r["score"]) for r in module.runs].index(("ash_s@90", parse_detector(spec).spec))
    torch.testing.assert_close(alone[:, 0], scores[:, column], rtol=1e-5, atol=1e-5)


def test_functional_fit_and_score_equal_pure_function() -> None:
    torch.manual_seed(0)
    import timm

    import ash_lightning.models  # noqa: F401

    model = timm.create_model("cifar_resnet20").eval()
    test_x = torch.cat([x for x, _ in TEST])
    for spec in ("knn@5", "mds", "adascale"):
        fitted = fit_detector(model, spec, _loader(*FIT), shaping="ash_s@90")
        ours = detector_scores(model, fitted, test_x, shaping="ash_s@90")
        torch.testing.assert_close(ours, _reference(model, spec, "ash_s@90", ()), rtol=1e-4, atol=1e-4)
    odin = detector_scores(model, FittedDetector(parse_detector("odin"), {}), test_x, std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(odin, _reference(model, "odin", "none", (0.5, 0.5, 0.5)))


# ---------------------------------------------------------------------------------------------------- cache
class _CountFits:
    """Counts the fit passes of ``fit_detectors``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = detector_fitting._fit_missing

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(detector_fitting, "_fit_missing", counted)


def test_fit_cache_hits_and_misses_on_each_key_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASH_CACHE_DIR", str(tmp_path / "cache"))
    fits = _CountFits(monkeypatch)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        model = OODEvalModule("cifar_resnet20").model
    fit_spec = {"kind": "npz", "path": "fit.npz"}

    def run(
        spec: str = "knn@5", shaping: str = "none", placement: str = "penultimate", max_samples: int | None = None
    ) -> FittedDetector:
        key = make_cache_key(network_identity("cifar_resnet20", model), fit_spec)
        settings = FitSettings.of_shapers(model, [get_shaping(shaping)], placement)
        fit = FitPass(lambda: _loader(*FIT), key, max_samples)
        ((fitted,),) = fit_detectors([parse_detector(spec)], settings, placement, fit)
        return fitted

    first = run()
    assert fits.calls == 1
    again = run()
    assert fits.calls == 1  # hit: no pass over the fit data
    torch.testing.assert_close(dict(again.stats), dict(first.stats))
    misses = [
        lambda: run(spec="knn@6"),
        lambda: run(shaping="ash_s@90"),
        lambda: run(placement="pre_pool"),
        lambda: run(max_samples=32),
    ]
    for count, miss in enumerate(misses, start=2):
        miss()
        assert fits.calls == count
    fit_spec = {"kind": "npz", "path": "fit.npz", "select": "0::2"}  # other fit data
    run()
    assert fits.calls == 6
    with torch.no_grad():  # other weights, however they were loaded
        model.get_classifier().bias[0] += 1.0
    run()
    assert fits.calls == 7
    run()
    assert fits.calls == 7
    fitted_nofit = run(spec="odin")  # needs no fit data: never a pass
    assert fits.calls == 7 and not fitted_nofit.stats


def test_module_reads_the_cache_on_a_second_run(
    tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ash_lightning.data import OODDataModule

    monkeypatch.setenv("ASH_CACHE_DIR", str(tmp_path / "cache"))
    fits = _CountFits(monkeypatch)

    def run() -> Tensor:
        module = OODEvalModule(
            "cifar_resnet20", checkpoint_path=str(tiny_checkpoint), shaping=["none", "ash_b@65"], score=["knn@5"]
        )
        data = OODDataModule(
            id={"kind": "npz", "path": str(tiny_data["id"]), "limit": 20},
            ood={"dark": {"kind": "npz", "path": str(tiny_data["dark"]), "limit": 20}},
            fit={"kind": "npz", "path": str(tiny_data["id"]), "limit": 40},
            backbone="cifar_resnet20",
            batch_size=16,
        )
        return _test(module, data)

    first = run()
    assert fits.calls == 1
    torch.testing.assert_close(run(), first, rtol=0, atol=0)
    assert fits.calls == 1
    assert len(list((tmp_path / "cache" / "detectors").glob("*.pt"))) == 2  # one per shaping


# ---------------------------------------------------------------------------------------------------- errors
class _CountPasses:
    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        model.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def test_mds_without_fit_labels_fails_before_any_backbone_pass() -> None:
    class Unlabelled(TinyData):
        def fit_dataloader(self) -> DataLoader:
            return _loader(FIT[0], torch.full((len(FIT[0]),), -1))

    module = _module("none", ["energy", "mds"])
    passes = _CountPasses(module.model)
    with pytest.raises(UserError, match="mds needs the class labels") as err:
        _test(module, Unlabelled())
    assert passes.calls == 0 and "Fix:" in str(err.value)


def test_fitted_detector_without_fit_data_fails_before_any_backbone_pass() -> None:
    class NoFit(TinyData):
        def fit_dataloader(self) -> None:
            return None

    module = _module("none", ["energy", "knn@5", "vim@16"])
    passes = _CountPasses(module.model)
    with pytest.raises(UserError, match=r"knn@5, vim@16 need ID fit data: set data.fit"):
        _test(module, NoFit())
    assert passes.calls == 0


def test_feature_detector_on_a_network_without_classifier_fails_before_any_pass(tmp_path: Path) -> None:
    class Features(pl.LightningModule):  # a network that ends in pooled features: no classifier
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, x: Tensor) -> Tensor:  # odin re-runs the module itself: no child has a classifier
            return self.net(x)

        def test_step(self, batch, batch_idx, dataloader_idx=0):
            return self(batch[0])

    module = Features()
    passes = _CountPasses(module.net)
    metrics = OODMetricsCallback(score="knn@5", fit_dataloader=_loader(*FIT), output_dir=str(tmp_path))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[metrics])
    with pytest.raises(UserError, match=r"knn@5 reads the penultimate features .* Features has no classifier"):
        trainer.test(module, dataloaders=[_loader(*t) for t in TEST], verbose=False)
    assert passes.calls == 0
    with pytest.raises(UserError, match="fit_detector: vim@16 reads the penultimate features"):
        fit_detector(module.net, "vim@16", _loader(*FIT))
    odin = OODMetricsCallback(score="odin", output_dir=str(tmp_path / "odin"), log_figures=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[odin])
    trainer.test(module, dataloaders=[_loader(*t) for t in TEST], verbose=False)  # odin needs no classifier
    assert odin.results["counts"] == {"id": 21, "ood1": 19}


def test_unknown_score_names_the_detector_forms() -> None:
    with pytest.raises(UserError, match=r"model.score: .*Or a detector: mds, rmds, knn@K"):
        OODEvalModule("cifar_resnet20", score=["energy", "kn@5"])


# ---------------------------------------------------------------------------------------------------- callback
class PlainClassifier(pl.LightningModule):
    """A user's module that knows nothing of ash-lightning: test_step returns logits."""

    def __init__(self) -> None:
        super().__init__()
        import timm

        import ash_lightning.models  # noqa: F401

        torch.manual_seed(0)
        self.net = timm.create_model("cifar_resnet20")

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        x, _, _ = batch
        return self.net(x)


@pytest.mark.parametrize("spec", ["knn@5", *NEWER])
def test_callback_detector_reads_shaped_features(tmp_path: Path, spec: str) -> None:
    module = PlainClassifier()
    fit = _loader(*FIT)
    metrics = OODMetricsCallback(score=spec, fit_dataloader=fit, output_dir=str(tmp_path), log_figures=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        callbacks=[metrics, ActivationShapingCallback("ash_s@90")],  # the shaping attaches after the metrics start
    )
    trainer.test(module, dataloaders=[_loader(*t) for t in TEST], verbose=False)
    store, _ = load_scores(str(tmp_path))
    ours = np.concatenate([store["id"]["scores"][:, 0], store["ood1"]["scores"][:, 0]])
    expected = _reference(module.net.eval(), spec, "ash_s@90", ())
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert metrics.results["runs"][0]["score"] == parse_detector(spec).spec
    assert not module.net.get_classifier()._forward_hooks  # the capture hook is gone


@pytest.mark.parametrize("spec", ["odin@1000@0.0014", "adascale"])
def test_callback_gradient_detector_equals_functional_scores(tmp_path: Path, spec: str) -> None:
    """A plain user module under Lightning's inference-mode test loop: the callback re-runs the network on the
    batch images with gradients and gives the functional ``detector_scores`` of the same batches."""
    module, std = PlainClassifier(), (0.5, 0.25, 0.2)
    fit = _loader(*FIT)
    metrics = OODMetricsCallback(score=spec, fit_dataloader=fit, std=std, output_dir=str(tmp_path), log_figures=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[metrics])
    loaders = [_loader(*t) for t in TEST]
    trainer.test(module, dataloaders=loaders, verbose=False)
    store, _ = load_scores(str(tmp_path))
    ours = np.concatenate([store["id"]["scores"][:, 0], store["ood1"]["scores"][:, 0]])
    net = module.net.eval()
    fitted = (
        fit_detector(net, spec, fit) if parse_detector(spec).needs_fit else FittedDetector(parse_detector(spec), {})
    )
    expected = torch.cat([detector_scores(net, fitted, x, std=std) for loader in loaders for x, _, _ in loader])
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert metrics.results["runs"][0]["score"] == parse_detector(spec).spec
    assert all(p.grad is None for p in net.parameters())  # gradients reached the input only
    if spec == "odin@1000@0.0014":  # std matters: with ones the step differs
        ones = torch.cat([detector_scores(net, fitted, x) for loader in loaders for x, _, _ in loader])
        assert not np.allclose(ours, ones.numpy(), rtol=1e-4, atol=1e-5)


def test_callback_std_is_checked() -> None:
    with pytest.raises(UserError, match="std must be the data transform's per-channel standard deviations"):
        OODMetricsCallback(score="odin", std=(0.5, 0.0, 0.5))


# ---------------------------------------------------------------------------------------------------- main.py
def _results(out: Path) -> dict:
    return json.loads((out / "run" / "v" / "ood_results.json").read_text())


def test_main_with_detectors_one_and_two_processes(tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """main.py with [energy, mds, knn@5, vim@3]: results in the usual layout; DDP (2 CPU processes, each fitting
    on the whole fit set, separate caches) gives the same evaluation (``tests/run_equality.py``: exact sample sets,
    scores to float32 rounding, metrics equal or within the near-tie bound). (D = 3: the tiny model's fit features
    span only 7 dimensions, and ViM refuses a D that leaves no residual.)"""
    scores = ["energy", "mds", "knn@5", "vim@3"]
    outputs = {}
    for name, extra in (("one", ()), ("two", ("--trainer.devices", "2", "--trainer.strategy", "ddp"))):
        config = tiny_config(tiny_data, tiny_checkpoint, tmp_path / name, shaping=["none", "react@1.0"], score=scores)
        config["data"]["fit"] = {"kind": "npz", "path": str(tiny_data["id"]), "limit": 60}
        proc = run_main(config, tmp_path, *extra, env={"ASH_CACHE_DIR": str(tmp_path / f"cache_{name}")})
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[name] = tmp_path / name
    one, two = _results(outputs["one"]), _results(outputs["two"])
    assert [(r["shaping"], r["score"]) for r in one["runs"]] == [
        (s, c) for s in ("none", get_shaping("react@1.0").spec) for c in scores
    ]
    assert sorted(one["ranking"]) == list(range(8))
    csv = (outputs["one"] / "run" / "v" / "ood_results.csv").read_text()
    assert "knn@5" in csv and "mds" in csv
    assert two["config"]["trainer"]["world_size"] == 2
    assert_same_evaluation(outputs["one"] / "run" / "v", outputs["two"] / "run" / "v")


def test_main_mds_on_unlabelled_fit_data_is_one_user_error(
    tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x=np.load(tiny_data["id"])["x"][:20])
    config = tiny_config(tiny_data, tiny_checkpoint, tmp_path, score=["energy", "mds"])
    config["data"]["fit"] = {"kind": "npz", "path": str(unlabelled)}
    status, out, err = main_in_process(config, tmp_path)
    assert status == 2
    assert "error: mds needs the class labels of the ID fit data" in err and "Traceback" not in err


EVERY_SHAPING = ["none", "ash_p", "ash_b", "ash_s", "ash_rand", "react@p90", "react_and_ash@1.0@65", "scale"]
EVERY_SHAPING += ["vra@10@90", "dice@50", "lts@65", "bfact", "ras", "rankfeat"]
# optfs is not here: its logits (theta of norm 1000) saturate the softmax, so klm's KL to a class-mean softmax with
# exact zeros is inf for some samples, as in OpenOOD's scipy entropy; tests/shaping covers optfs in main.py.
WITHOUT = {"optfs"}


def test_main_newer_detectors_in_a_sweep_of_every_shaping(
    tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """main.py test with the newer detectors next to energy, under every kind of shaping, fitted on data.fit: one
    run per (shaping, score), every score finite, the same scores again from the fit cache."""
    from ash_lightning.shaping.specs import list_shapings

    assert {get_shaping(s).name for s in EVERY_SHAPING} >= {e.name for e in list_shapings()} - WITHOUT
    monkeypatch.setenv("ASH_CACHE_DIR", str(tmp_path / "cache"))
    scores = ["energy", *(spec.replace("residual@8", "residual@3") for spec in NEWER)]  # ASH leaves rank 8 or less
    config = tiny_config(tiny_data, tiny_checkpoint, tmp_path / "out", shaping=EVERY_SHAPING, score=scores)
    config["data"]["fit"] = {"kind": "npz", "path": str(tiny_data["id"]), "limit": 60}
    # (the random network's logits of one 'dark' sample are non-finite under one of the shapings; the detectors'
    # scores are finite there, but the run stops on the logits)
    config["data"]["ood"] = {"bright": config["data"]["ood"]["bright"]}
    config["data"]["groups"] = {"far": ["bright"]}
    status, _, err = main_in_process(config, tmp_path)
    assert status == 0, err[-3000:]
    results = _results(tmp_path / "out")
    assert [r["score"] for r in results["runs"]] == [
        parse_detector(s).spec if s != "energy" else s for s in scores
    ] * len(EVERY_SHAPING)
    store, _ = load_scores(str(tmp_path / "out" / "run" / "v"))
    assert all(np.isfinite(part["scores"]).all() for part in store.values())
    first = {name: part["scores"] for name, part in store.items()}
    status, _, err = main_in_process(config, tmp_path)
    assert status == 0, err[-3000:]
    store, _ = load_scores(str(tmp_path / "out" / "run" / "v"))
    fixed = [i for i, run in enumerate(results["runs"]) if not run["shaping"].startswith("ash_rand")]  # random draws
    for name, part in store.items():
        np.testing.assert_array_equal(part["scores"][:, fixed], first[name][:, fixed])
