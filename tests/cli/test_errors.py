"""Bad input, faults and numerics: one clear message and exit status 2, no traceback unless asked for, and
nothing an earlier data set produced is lost when a later one fails."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ash_lightning.callbacks import OODMetricsCallback
from ash_lightning.cli.app import main
from ash_lightning.cli.exit_codes import user_error
from ash_lightning.data.base import CorruptImageError
from ash_lightning.errors import UserError
from ash_lightning.evaluation.metrics import ood_metrics
from ash_lightning.evaluation.score_store import load_scores
from ash_lightning.module import OODEvalModule
from ash_lightning.scores.specs import get_score
from ash_lightning.shaping.specs import get_shaping
from tests.conftest import REPO, main_in_process, run_main, tiny_config, write_image_folder, write_npz

TRACEBACK = "Traceback (most recent call last)"
METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out")


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASH_DEBUG", raising=False)


def _run_dir(out: Path) -> Path:
    return out / "run" / "v"


def _assert_finite_metrics(results: dict) -> None:
    for run in results["runs"]:
        for metrics in [*run["ood"].values(), run["mean"], *run["groups"].values()]:
            assert set(metrics) == set(METRICS)
            assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in metrics.values()), metrics


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict[str, Path]:
    """Checkpoints that are garbage, truncated, not a state_dict, of the wrong shape or keys; empty data sets, a
    folder of corrupt images only, and a 4-image ID set that is quick to evaluate before them."""
    root = tmp_path_factory.mktemp("bad")
    saved = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in saved.items()}
    files = {
        "garbage": root / "garbage.th",
        "truncated": root / "truncated.th",
        "no_state_dict": root / "hparams.th",
        "wrong_shape": root / "ten_to_five.th",
        "extra_key": root / "extra.th",
        "missing_key": root / "missing.th",
        "empty_npz": root / "empty.npz",
        "empty_folder": root / "empty_folder",
        "all_corrupt": root / "all_corrupt",
        "small_id": write_npz(root / "small_id.npz", 4, 0),
    }
    files["garbage"].write_text("this is not a checkpoint\n")
    files["truncated"].write_bytes(tiny_checkpoint.read_bytes()[:5000])
    torch.save({"epoch": 3, "lr": 0.1}, files["no_state_dict"])
    torch.save({**state, "linear.weight": torch.zeros(5, 64), "linear.bias": torch.zeros(5)}, files["wrong_shape"])
    torch.save({**state, "extra.weight": torch.zeros(3)}, files["extra_key"])
    torch.save({k: v for k, v in state.items() if k != "linear.bias"}, files["missing_key"])
    np.savez(files["empty_npz"], x=np.zeros((0, 32, 32, 3), np.uint8), y=np.zeros(0, np.int64))
    files["empty_folder"].mkdir()
    write_image_folder(files["all_corrupt"], 0, 0, truncated=("a.jpg", "b.jpg"))
    return files


def _apply(config: dict, edits: dict[str, object]) -> dict:
    """``config`` with each dotted key of ``edits`` (e.g. ``data.ood.bright``) set to its value."""
    for key, value in edits.items():
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config


def _folder(path: Path) -> dict[str, str]:
    return {"kind": "folder", "path": str(path)}


# (case, config edits given the bad files, fragments of the message: what went wrong, where, how to fix it)
USER_ERRORS: list[tuple[str, Callable[[dict[str, Path]], dict[str, object]], tuple[str, ...]]] = [
    (
        "missing_dataset_path",
        lambda f: {"data.ood.bright": {"kind": "npz", "path": "/nonexistent/x.npz"}},
        ("data.ood.bright", "'/nonexistent/x.npz' does not exist", "Fix:"),
    ),
    (
        "empty_dataset_path",
        lambda f: {"data.ood.bright": {"kind": "npz", "path": ""}},
        ("data.ood.bright", "needs a `path`", "Fix:"),
    ),
    (
        "empty_ood_npz",
        lambda f: {"data.ood.bright": {"kind": "npz", "path": str(f["empty_npz"])}},
        ("data.ood.bright", "is empty", "Fix:"),
    ),
    (
        "empty_ood_folder",
        lambda f: {"data.ood.bright": _folder(f["empty_folder"])},
        ("data.ood.bright", "is empty", "Fix:"),
    ),
    (
        "ood_set_left_empty_by_skipped_files",
        lambda f: {
            "data.id": {"kind": "npz", "path": str(f["small_id"])},
            "data.ood.bright": _folder(f["all_corrupt"]),
            "data.skip_corrupt": True,
        },
        ("'bright' has no sample left to evaluate", "2 corrupt files skipped", "Fix:"),
    ),
    (
        "unknown_dataset_kind",
        lambda f: {"data.ood.bright": {"kind": "imagenet21k", "path": "/x"}},
        ("data.ood.bright", "unknown data set kind 'imagenet21k'", "Fix: use one of"),
    ),
    (
        "unknown_timm_model",
        lambda f: {"model.backbone": "resnet_does_not_exist"},
        ("unknown backbone 'resnet_does_not_exist'", "Fix: pick a name from timm.list_models()"),
    ),
    (
        "unknown_shaping",
        lambda f: {"model.shaping": "ash_q@90"},
        ("model.shaping", "unknown shaping name 'ash_q'", "Valid forms"),
    ),
    (
        "calibrated_shapings_without_fit_data",
        lambda f: {"model.shaping": ["none", "optfs", "bfact@95", "ras"]},
        ("optfs, bfact@95@2, ras need ID statistics", "set data.fit"),
    ),
    (
        "optfs_at_another_placement",
        lambda f: {"model.shaping": ["ras", "optfs"], "model.placement": "pre_pool"},
        ("model.placement: optfs", "only works at placement 'penultimate', not 'pre_pool'", "Fix: set placement"),
    ),
    (
        "rankfeat_without_resnet_stages",
        lambda f: {"model.backbone": "test_vit", "model.checkpoint_path": None, "model.shaping": ["none", "rankfeat"]},
        ("model.shaping: rankfeat removes", "VisionTransformer has no ResNet stages", "Fix: use rankfeat with"),
    ),
    (
        "rankfeat_with_the_feature_cache",
        lambda f: {"model.shaping": ["none", "rankfeat"], "model.feature_cache": str(f["empty_folder"])},
        ("model.shaping: rankfeat re-runs the last stage", "Fix: remove model.feature_cache"),
    ),
    (
        "checkpoint_missing",
        lambda f: {"model.checkpoint_path": "/nonexistent/resnet20.th"},
        ("checkpoint '/nonexistent/resnet20.th' does not exist", "Fix: point checkpoint_path"),
    ),
    (
        "checkpoint_is_a_folder",
        lambda f: {"model.checkpoint_path": str(f["empty_folder"])},
        ("is a folder, not a file", "Fix: point checkpoint_path"),
    ),
    (
        "checkpoint_garbage",
        lambda f: {"model.checkpoint_path": str(f["garbage"])},
        ("could not read checkpoint", "garbage.th", "Fix: it must be a file written by torch.save"),
    ),
    (
        "checkpoint_truncated",
        lambda f: {"model.checkpoint_path": str(f["truncated"])},
        ("could not read checkpoint", "truncated.th", "re-download it"),
    ),
    (
        "checkpoint_not_a_state_dict",
        lambda f: {"model.checkpoint_path": str(f["no_state_dict"])},
        ("hparams.th", "holds no state_dict", "Fix: save model.state_dict()"),
    ),
    (
        "checkpoint_shape_mismatch",
        lambda f: {"model.checkpoint_path": str(f["wrong_shape"])},
        ("ten_to_five.th", "shape mismatches (2)", "linear.weight (5, 64) vs model (10, 64)", "Fix: check `backbone`"),
    ),
    (
        "checkpoint_unexpected_key",
        lambda f: {"model.checkpoint_path": str(f["extra_key"])},
        ("extra.th", "unexpected keys (1): extra.weight", "strict_loading: false"),
    ),
    (
        "checkpoint_missing_key",
        lambda f: {"model.checkpoint_path": str(f["missing_key"])},
        ("missing.th", "missing keys (1): linear.bias", "strict_loading: false"),
    ),
    ("unknown_config_key", lambda f: {"model.bogus_key": 1}, ("invalid configuration", "'model.bogus_key'", "--help")),
    (
        "misspelt_nested_config_key",
        lambda f: {"data.batchsize": 16},
        ("invalid configuration", "'data.batchsize'", "--help"),
    ),
    (
        "wrong_value_type",
        lambda f: {"data.batch_size": "sixteen"},
        ("invalid configuration", "data.batch_size", "sixteen", "--help"),
    ),
]


@pytest.mark.parametrize("edits, fragments", [case[1:] for case in USER_ERRORS], ids=[case[0] for case in USER_ERRORS])
@pytest.mark.filterwarnings("ignore:skipping corrupt image")
def test_user_error_is_one_clear_message_and_exit_status_2(
    edits: Callable[[dict[str, Path]], dict[str, object]],
    fragments: tuple[str, ...],
    bad_files: dict[str, Path],
    tiny_data: dict[str, Path],
    tiny_checkpoint: Path,
    tmp_path: Path,
) -> None:
    """``cli.main`` (what main.py runs) in-process: the subprocess tests below cover the process boundary."""
    config = _apply(tiny_config(tiny_data, tiny_checkpoint, tmp_path), edits(bad_files))
    status, _, stderr = main_in_process(config, tmp_path)
    assert status == 2
    (message,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    for fragment in fragments:
        assert fragment in message
    assert TRACEBACK not in stderr and "ASH_DEBUG=1" in stderr


def test_main_py_exits_2_without_traceback_and_ash_debug_shows_it(
    tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    config = _apply(tiny_config(tiny_data, tiny_checkpoint, tmp_path), {"data.batchsize": 16})
    proc = run_main(config, tmp_path)
    assert proc.returncode == 2 and TRACEBACK not in proc.stderr
    (message,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "'data.batchsize'" in message and "usage:" not in proc.stderr
    config = _apply(tiny_config(tiny_data, tiny_checkpoint, tmp_path), {"model.shaping": "ash_s@150"})
    debug = run_main(config, tmp_path, env={"ASH_DEBUG": "1"})
    assert debug.returncode != 0 and TRACEBACK in debug.stderr
    assert "UserError: model.shaping: Invalid shaping spec 'ash_s@150'" in debug.stderr


def test_debug_flag_reraises_the_user_error(tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = _apply(tiny_config(tiny_data, tiny_checkpoint, tmp_path), {"model.score": "entropy_plus"})
    with pytest.raises(UserError, match="model.score"):
        main_in_process(config, tmp_path, "--debug")


class _Raising(Dataset):
    """A data set whose every item raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> None:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [CorruptImageError("/data/x.png", "OSError: truncated"), UserError("data.fit: bad file. Fix: replace it.")],
    ids=["subclass", "plain"],
)
def test_user_errors_from_workers_and_cause_chains_are_unwrapped(error: UserError) -> None:
    # PyTorch re-raises it with the worker's traceback as the message, as the error's own type when that type can
    # be rebuilt from the message alone (UserError) and as a RuntimeError otherwise (CorruptImageError)
    with pytest.raises((type(error), RuntimeError), match=re.escape(TRACEBACK)) as raised:
        next(iter(DataLoader(_Raising(error), num_workers=1)))
    assert str(user_error(raised.value)) == str(error)
    with pytest.raises(RuntimeError, match="a hook failed") as wrapped:
        raise RuntimeError("a hook failed") from error
    assert user_error(wrapped.value) is error
    assert user_error(RuntimeError("a bug")) is None


def _ood_after(tiny_data: dict[str, Path], folder: Path) -> dict[str, object]:
    """OOD sets ``dark`` (npz) then ``zfolder`` (the image folder): the config is written with sorted keys."""
    return {
        "data.ood": {"dark": {"kind": "npz", "path": str(tiny_data["dark"])}, "zfolder": _folder(folder)},
        "data.groups": {"near": ["dark"], "far": ["zfolder"]},
    }


def test_corrupt_image_on_a_later_set_stops_the_run_and_keeps_earlier_scores(
    tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    (bad,) = write_image_folder(tmp_path / "images", 6, 0, truncated=("img002_cut.jpg",))
    # workers load ahead of evaluation: the error must still come when its batch is evaluated, after `dark`
    config = _apply(
        tiny_config(tiny_data, tiny_checkpoint, tmp_path),
        {**_ood_after(tiny_data, tmp_path / "images"), "data.num_workers": 1},
    )
    proc = run_main(config, tmp_path)
    assert proc.returncode == 2 and TRACEBACK not in proc.stderr
    (message,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert f"cannot decode image {str(bad)!r}" in message and "skip_corrupt: true" in message
    run_dir = _run_dir(tmp_path)
    assert f"python main.py report {run_dir}" in proc.stderr  # logged by Lightning's rank_zero_info
    store, _ = load_scores(str(run_dir))
    assert set(store) == {"id", "dark"}
    assert len(store["id"]["index"]) == 101 and len(store["dark"]["index"]) == 67
    assert not (run_dir / "ood_results.json").exists()

    report = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "report", str(run_dir)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert "| dark |" in report.stdout and "| *near* |" in report.stdout and "| zfolder |" not in report.stdout
    assert "the run stopped before them): zfolder" in report.stdout
    results = json.loads((run_dir / "ood_results.json").read_text())
    (run,) = results["runs"]
    assert set(run["ood"]) == {"dark"} and results["missing"] == ["zfolder"] and run["groups"] == {"near": run["mean"]}
    expected = ood_metrics(store["id"]["scores"][:, 0], store["dark"]["scores"][:, 0])
    assert run["ood"]["dark"] == pytest.approx(expected, abs=1e-12)
    _assert_finite_metrics(results)
    assert main(["report", str(run_dir / "scores.npz")]) == 0  # the file itself works too


def test_skip_corrupt_skips_with_a_warning_and_records_the_paths(
    tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    bad = write_image_folder(tmp_path / "images", 6, 0, truncated=("img001_cut.jpg", "img004_cut.jpg"))
    config = _apply(
        tiny_config(tiny_data, tiny_checkpoint, tmp_path),
        {**_ood_after(tiny_data, tmp_path / "images"), "data.skip_corrupt": True, "ood_metrics.log_figures": False},
    )
    with pytest.warns(UserWarning, match="skipping corrupt image") as caught:
        status, stdout, stderr = main_in_process(config, tmp_path)
    assert status == 0, stderr[-2000:]
    assert {str(path) for path in bad} <= {str(w.message).split("'")[1] for w in caught if "skipping" in str(w.message)}
    results = json.loads((_run_dir(tmp_path) / "ood_results.json").read_text())
    assert results["skipped"] == {"zfolder": [str(path) for path in bad]}
    assert results["counts"] == {"id": 101, "dark": 67, "zfolder": 6}
    store, _ = load_scores(str(_run_dir(tmp_path)))
    assert np.array_equal(np.sort(store["zfolder"]["index"]), [0, 1, 3, 4, 5, 7])  # 2 and 6 are the cut files
    _assert_finite_metrics(results)
    assert "| zfolder |" in stdout


class NonFiniteLogits(pl.LightningModule):
    """Logits of a fixed linear map; NaN for OOD samples with index % 7 == 3 and, with ``bad_id``, an -inf logit
    for ID sample 5 (whose energy score stays finite: the logits are checked too)."""

    def __init__(self, bad_id: bool) -> None:
        super().__init__()
        self.head, self.bad_id = torch.nn.Linear(12, 4), bad_id

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x, _, index = batch
        logits = self.head(x)
        if dataloader_idx == 1:
            logits[index % 7 == 3] = float("nan")
        elif self.bad_id:
            logits[index == 5, 0] = float("-inf")
        return logits


class InterruptedOnOODSet(pl.LightningModule):
    """Logits of a fixed linear map; Ctrl+C (KeyboardInterrupt) on the first batch of the OOD set."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(12, 4)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        if dataloader_idx == 1:
            raise KeyboardInterrupt
        return self.head(batch[0])


def _plain_run(tmp_path: Path, module: pl.LightningModule, nonfinite: str = "raise") -> OODMetricsCallback:
    """Test ``module`` with ``OODMetricsCallback`` on an ID set of 40 and an OOD set ``far`` of 30 samples."""
    torch.manual_seed(0)
    sets = [(torch.randn(40, 12), 40), (torch.randn(30, 12) + 1, 30)]
    loaders = [
        DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long), torch.arange(n)), batch_size=16) for x, n in sets
    ]
    callback = OODMetricsCallback(ood_names=["far"], nonfinite=nonfinite, output_dir=str(tmp_path), log_figures=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[callback],
        enable_progress_bar=False,
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        enable_model_summary=False,
    )
    trainer.test(module, dataloaders=loaders, verbose=False)
    return callback


def test_interrupt_on_a_later_set_keeps_the_earlier_scores(tmp_path: Path, lightning_log: list[str]) -> None:
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exited:  # Lightning turns Ctrl+C into exit status 1
            _plain_run(tmp_path, InterruptedOnOODSet())
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores further Ctrl+C while it shuts down
    assert exited.value.code == 1
    store, _ = load_scores(str(tmp_path))
    assert set(store) == {"id"} and np.array_equal(store["id"]["index"], np.arange(40))
    out = "\n".join(lightning_log)  # only the ID set is saved: no report can work, and none is suggested
    assert "before its first OOD set was finished" in out and "main.py report" not in out


def test_nonfinite_scores_stop_the_run_naming_the_set_and_count(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"4 of 30 samples of data set 'far' have non-finite \(NaN/Inf\)") as raised:
        _plain_run(tmp_path, NonFiniteLogits(bad_id=False))
    assert "nonfinite: drop" in str(raised.value)
    store, _ = load_scores(str(tmp_path))  # the ID set, finished before, is on disk
    assert set(store) == {"id"} and len(store["id"]["index"]) == 40


def test_nonfinite_drop_drops_and_records_the_samples(tmp_path: Path) -> None:
    results = _plain_run(tmp_path, NonFiniteLogits(bad_id=True), nonfinite="drop").results
    assert results["dropped_nonfinite"] == {"id": 1, "far": 4}
    assert results["counts"] == {"id": 39, "far": 26}
    _assert_finite_metrics(results)
    text = (tmp_path / "ood_results.json").read_text()
    assert json.loads(text)["dropped_nonfinite"] == {"id": 1, "far": 4} and "NaN" not in text
    store, _ = load_scores(str(tmp_path))
    assert all(np.isfinite(store[name]["scores"]).all() for name in ("id", "far"))
    assert 5 not in store["id"]["index"] and not np.isin([3, 10, 17, 24], store["far"]["index"]).any()


def test_one_sample_id_and_ood_sets_give_well_defined_metrics(
    tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    single = {
        "id": write_npz(tmp_path / "one_id.npz", 1, 5),
        "dark": write_npz(tmp_path / "one_ood.npz", 1, 6, 0.4),
        "bright": tiny_data["bright"],
    }
    status, stdout, stderr = main_in_process(tiny_config(single, tiny_checkpoint, tmp_path), tmp_path)
    assert status == 0, stderr[-3000:]
    results = json.loads((_run_dir(tmp_path) / "ood_results.json").read_text())
    assert results["counts"] == {"id": 1, "dark": 1, "bright": 53}
    _assert_finite_metrics(results)
    (run,) = results["runs"]
    assert run["ood"]["dark"]["auroc"] in (0.0, 0.5, 1.0) and run["ood"]["dark"]["fpr95"] in (0.0, 1.0)
    assert run["id_accuracy"] in (0.0, 1.0) and "| **mean** |" in stdout and "nan" not in stdout.lower()


SPECS = ["none", "ash_p@90", "ash_b@65", "ash_s@90", "ash_rand@65", "react@1.0", "react_and_ash@1.0@90", "scale@85"]
EDGE_SAMPLES = {
    "all_zero": torch.zeros(2, 64),
    "constant": torch.full((2, 64), 3.0),
    "all_negative": -torch.rand(2, 64) - 0.5,
    "single_element": torch.rand(3, 1) + 0.5,
    "batch_of_one": torch.rand(1, 16, 4, 4),
    "float16_large": torch.full((2, 4096), 30000.0, dtype=torch.float16),  # sums overflow float16
    "float16_large_batch_of_one": (torch.rand(1, 512, 2, 2) * 6e4).half(),
}


@pytest.mark.parametrize("case", EDGE_SAMPLES)
@pytest.mark.parametrize("spec", SPECS)
def test_shaping_edge_samples_give_finite_features_and_scores(spec: str, case: str) -> None:
    x = EDGE_SAMPLES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the documented once-per-process warning about negative activations
        out = get_shaping(spec)(x)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    if case == "all_zero" and not spec.startswith("ash_rand"):
        assert torch.equal(out, x)  # documented: an all-zero sample comes back as zeros
    if case == "single_element" and spec.startswith("ash_p"):
        assert torch.equal(out, x)  # documented: k >= 1, so a single-element sample keeps its element
    features = out.flatten(1).float()
    logits = features @ torch.linspace(-1, 1, features.shape[1] * 10).reshape(features.shape[1], 10) / features.shape[1]
    for score in ("energy", "msp", "max_logit", "neg_entropy", "gen"):
        assert torch.isfinite(get_score(score)(logits)).all(), score


def test_float16_module_with_batch_of_one_gives_finite_scores(tiny_checkpoint: Path) -> None:
    module = OODEvalModule(
        "cifar_resnet20",
        checkpoint_path=str(tiny_checkpoint),
        shaping=["ash_s@90", "scale@85"],
        score=["energy", "msp"],
    ).half()
    with torch.inference_mode():
        out = module.test_step((torch.rand(1, 3, 32, 32).half() * 50, torch.tensor([3]), torch.tensor([0])), 0)
    assert out["scores"].shape == (1, 4) and torch.isfinite(out["scores"]).all()
    assert torch.isfinite(out["logits"]).all()


def test_select_and_exclude_give_disjoint_fit_and_test_splits(tiny_data: dict) -> None:
    from ash_lightning.data.sources import build_source
    from ash_lightning.errors import UserError

    path = str(tiny_data["id"])
    fit = build_source({"kind": "npz", "path": path, "select": "0::10"}, "data.fit")
    test = build_source({"kind": "npz", "path": path, "exclude": "0::10"}, "data.id")
    assert len(fit) == 11 and len(test) == 90 and len(fit) + len(test) == 101
    fit_pixels = {fit.dataset[i][0].tobytes() for i in range(len(fit))}
    assert not fit_pixels & {test.dataset[i][0].tobytes() for i in range(len(test))}
    with pytest.raises(UserError, match="is not a slice"):
        build_source({"kind": "npz", "path": path, "select": "every tenth"}, "data.fit")
