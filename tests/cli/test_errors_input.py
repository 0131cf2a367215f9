"""Bad input and faults, round two: every option checked where it is parsed, data faults told apart, silent wrong
results turned into errors or warnings, and runs stopped by a signal that exit non-zero with their finished sets
saved. Each user error is one ``error:`` line naming the key or file, exit status 2, no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ash_lightning.cli.app import main
from ash_lightning.cli.exit_codes import user_error
from ash_lightning.data.base import FileSource
from ash_lightning.evaluation.constant_scores import EQUAL_SCORES_FLAG
from ash_lightning.evaluation.metrics import threshold_at_tpr
from ash_lightning.evaluation.score_store import load_scores, save_scores
from ash_lightning.models.backbone import RandomWeightsWarning
from ash_lightning.shaping.specs import SHAPINGS, register_shaping
from tests.cli.test_errors import TRACEBACK, _apply, _run_dir
from tests.conftest import REPO, main_in_process, tiny_config, write_image_folder, write_npz


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASH_DEBUG", raising=False)
    monkeypatch.delenv("ASH_UNSET_VAR", raising=False)


def _one_error_line(status: int, stderr: str) -> str:
    assert status == 2 and TRACEBACK not in stderr, stderr[-3000:]
    (message,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    return message


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Broken .npz archives and label arrays, a folder mixing class folders with loose images, a plain file."""
    root = tmp_path_factory.mktemp("faulty")
    images = np.zeros((5, 8, 8, 3), np.uint8)
    good = write_npz(root / "good.npz", 5, 0, size=8)
    raw = good.read_bytes()
    files = {
        name: root / f"{name}.npz"
        for name in (
            "truncated",
            "zero_bytes",
            "bad_crc",
            "plain_npy",
            "string_labels",
            "one_hot_labels",
            "label_count",
            "no_x",
        )
    }
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    files["zero_bytes"].write_bytes(b"")
    flipped = bytearray(raw)
    flipped[raw.index(b"\x93NUMPY") + 100] ^= 0xFF  # inside the stored x.npy: its CRC-32 no longer matches
    files["bad_crc"].write_bytes(bytes(flipped))
    with open(files["plain_npy"], "wb") as f:
        np.save(f, images)
    np.savez(files["string_labels"], x=images, y=np.array(["cat"] * 5))
    np.savez(files["one_hot_labels"], x=images, y=np.eye(5, dtype=np.int64))
    np.savez(files["label_count"], x=images, y=np.arange(4))
    np.savez(files["no_x"], images=images)
    write_image_folder(root / "mixed" / "cats", 2, 0)
    write_image_folder(root / "mixed", 2, 1)
    (root / "a_file").write_text("not a folder\n")
    return {**files, "mixed": root / "mixed", "a_file": root / "a_file"}


def _npz(path: Path) -> dict[str, str]:
    return {"kind": "npz", "path": str(path)}


# (case, config edits given the faulty files, fragments of the one error line: the key or file, the cause, the fix).
# Option ranges are unit tests of the option checks (tests/test_options.py); one per parser stays end to end here.
OPTION_ERRORS: list[tuple[str, Callable[[dict[str, Path]], dict[str, object]], tuple[str, ...]]] = [
    ("batch_size_zero", lambda f: {"data.batch_size": 0}, ("data.batch_size: 0", "integer >= 1", "Fix:")),
    (
        "negative_calibration_samples",
        lambda f: {"model.calibration_samples": -5},
        ("model.calibration_samples: -5", "integer >= 1"),
    ),
    ("tpr_above_one", lambda f: {"ood_metrics.tpr": 1.5}, ("ood_metrics.tpr: 1.5", "(0, 1]", "Fix:")),
    (
        "too_small_limit_test_batches",
        lambda f: {"trainer.limit_test_batches": 0.001},
        ("invalid trainer setting", "limit_test_batches"),
    ),
    (
        "unknown_dotted_placement",
        lambda f: {"model.placement": "layer9.conv"},
        ("model.placement", "'layer9.conv'", "valid placements"),
    ),
    (
        "gpu_without_gpu",
        lambda f: {"trainer.accelerator": "gpu"},
        ("trainer.accelerator: 'gpu'", "no such device", "Fix: set trainer.accelerator: cpu"),
    ),
    (
        "output_dir_is_a_file",
        lambda f: {"ood_metrics.output_dir": str(f["a_file"])},
        ("ood_metrics.output_dir", "is a file", "Fix:"),
    ),
    (
        "logger_dir_is_a_file",
        lambda f: {"trainer.logger.init_args.save_dir": str(f["a_file"])},
        ("save_dir", "is a file", "Fix:"),
    ),
    (
        "unset_variable_in_checkpoint_path",
        lambda f: {"model.checkpoint_path": "$ASH_UNSET_VAR/resnet20.th"},
        ("model.checkpoint_path", "ASH_UNSET_VAR, which is not set", "export ASH_UNSET_VAR="),
    ),
    (
        "unset_variable_in_data_path",
        lambda f: {"data.ood.bright.path": "${ASH_UNSET_VAR}/x.npz"},
        ("data.ood.bright", "ASH_UNSET_VAR, which is not set"),
    ),
]

SILENT_ERRORS: list[tuple[str, Callable[[dict[str, Path]], dict[str, object]], tuple[str, ...]]] = [
    (
        "ood_set_named_like_the_id_set",
        lambda f: {"data.id.name": "dark"},
        ("data.ood.dark and data.id are both named 'dark'", "unique", "Fix: rename"),
    ),
    (
        "ood_set_named_id",
        lambda f: {"data.ood.id": {"kind": "gaussian", "num_samples": 4}},
        ("data.ood.id and data.id are both named 'id'",),
    ),
    (
        "ood_set_named_like_a_validation_set",
        lambda f: {
            "data.ood.val_dark": {"kind": "gaussian", "num_samples": 4},
            "data.val_id": {"kind": "gaussian"},
            "data.val_ood": {"dark": {"kind": "uniform"}},
        },
        ("named 'val_dark'",),
    ),
    (
        "shaping_listed_twice",
        lambda f: {"model.shaping": ["ash_s@90", "none", "ash_s@90.0"]},
        ("model.shaping lists 'ash_s@90' twice", "Fix: remove the repeat"),
    ),
    ("score_listed_twice", lambda f: {"model.score": ["energy", "energy"]}, ("model.score lists 'energy' twice",)),
    (
        "limit_test_batches_zero",
        lambda f: {"trainer.limit_test_batches": 0},
        ("no test batch was evaluated", "limit_test_batches", "Fix:"),
    ),
    (
        "folder_with_class_folders_and_loose_images",
        lambda f: {"data.ood.bright": {"kind": "folder", "path": str(f["mixed"])}},
        ("data.ood.bright", "class sub-folders ('cats')", "2 images directly inside it", "Fix: move"),
    ),
]

NPZ_ERRORS: list[tuple[str, tuple[str, ...]]] = [
    ("truncated", ("cannot read", "truncated.npz", "as a .npz archive", "BadZipFile")),
    ("zero_bytes", ("cannot read", "zero_bytes.npz", "is empty (0 bytes)")),
    ("bad_crc", ("cannot read", "bad_crc.npz", "CRC")),
    ("plain_npy", ("plain_npy.npz", "is a single .npy array, not a .npz archive")),
    ("string_labels", ("string_labels.npz", "not integer class indices", "Fix: map them")),
    ("one_hot_labels", ("one_hot_labels.npz", "shape (5, 5)", "y.argmax(1)")),
    ("label_count", ("label_count.npz", "5 images but 4 labels", "Fix: save one label per image")),
    ("no_x", ("no_x.npz", "has no array 'x' (it has ['images'])", "Fix: set `key`")),
]


@pytest.fixture
def config(tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path) -> dict:
    return tiny_config(tiny_data, tiny_checkpoint, tmp_path)


@pytest.mark.parametrize(
    "edits, fragments",
    [c[1:] for c in OPTION_ERRORS + SILENT_ERRORS],
    ids=[c[0] for c in OPTION_ERRORS + SILENT_ERRORS],
)
def test_bad_option_or_silent_mistake_is_one_error_line(
    edits: Callable, fragments: tuple[str, ...], config: dict, faulty: dict[str, Path], tmp_path: Path
) -> None:
    status, stdout, stderr = main_in_process(_apply(config, edits(faulty)), tmp_path)
    message = _one_error_line(status, stderr)
    for fragment in fragments:
        assert fragment in message, message
    assert "| **mean** |" not in stdout  # stopped before any set was evaluated


@pytest.mark.parametrize("name, fragments", NPZ_ERRORS, ids=[c[0] for c in NPZ_ERRORS])
def test_faulty_npz_is_one_error_line_that_tells_unreadable_from_incomplete(
    name: str, fragments: tuple[str, ...], config: dict, faulty: dict[str, Path], tmp_path: Path
) -> None:
    status, _, stderr = main_in_process(_apply(config, {"data.ood.bright": _npz(faulty[name])}), tmp_path)
    message = _one_error_line(status, stderr)
    assert "data.ood.bright" in message
    for fragment in fragments:
        assert fragment in message, message
    if name == "no_x":  # the archive was read: it must not be called unreadable
        assert "cannot read" not in message


def _yaml_with(config: dict, tmp_path: Path, edit: Callable[[str], str]) -> Path:
    path = tmp_path / "edited.yaml"
    path.write_text(edit(yaml.safe_dump(config)))
    return path


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (
            lambda text: text.replace("    dark:\n", "    bright:\n", 1),
            ("edited.yaml, line", "key 'bright' is given twice"),
        ),
        (
            lambda text: text.replace("\n  batch_size:", "\n\tbatch_size:", 1),
            ("edited.yaml, line", "a tab character", "replace the tabs"),
        ),
    ],
    ids=["duplicate_ood_key", "tab_indent"],
)
def test_yaml_duplicate_keys_and_tabs_are_one_error_line_from_main_py(
    edit: Callable[[str], str], fragments: tuple[str, ...], config: dict, tmp_path: Path
) -> None:
    """Through main.py in a subprocess: the process boundary shows no traceback either."""
    path = _yaml_with(config, tmp_path, edit)
    proc = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "test", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        check=False,
    )
    message = _one_error_line(proc.returncode, proc.stderr)
    for fragment in fragments:
        assert fragment in message, message


# ----------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_high_bit_depth_and_float_images_are_scaled_to_8_bits_not_clipped(mode: str, tmp_path: Path) -> None:
    ramp = np.linspace(0, 1, 64).reshape(8, 8)
    values = (ramp * 65535).astype(np.uint16) if mode == "I;16" else ramp.astype(np.float32)
    path = tmp_path / ("ramp.png" if mode == "I;16" else "ramp.tif")
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode == mode
    image, _ = FileSource([str(path)], [0])[0]
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.shape == (8, 8, 3)
    expected = np.rint(values / 65535.0 * 255) if mode == "I;16" else np.rint(values * 255)
    assert np.array_equal(pixels[..., 0], expected.astype(np.uint8))  # the full 0..255 range, monotone
    assert pixels.min() == 0 and pixels.max() == 255


# -------------------------------------------------------------------------------------------- warnings in runs
@pytest.fixture
def small_sets(tmp_path: Path) -> dict[str, Path]:
    return {
        "id": write_npz(tmp_path / "id.npz", 6, 0),
        "dark": write_npz(tmp_path / "dark.npz", 5, 1, 0.4),
        "bright": write_npz(tmp_path / "bright.npz", 5, 2, 1.6),
    }


def test_random_weights_warn_at_start_and_are_recorded_in_the_results(
    small_sets: dict[str, Path], tmp_path: Path
) -> None:
    config = tiny_config(small_sets, tmp_path / "unused.th", tmp_path)
    del config["model"]["checkpoint_path"]
    with pytest.warns(RandomWeightsWarning, match="RANDOM WEIGHTS: backbone 'cifar_resnet20'"):
        status, stdout, stderr = main_in_process(config, tmp_path)
    assert status == 0, stderr[-3000:]
    results = json.loads((_run_dir(tmp_path) / "ood_results.json").read_text())
    assert any("RANDOM WEIGHTS" in note for note in results["warnings"])
    assert "**Warning: RANDOM WEIGHTS" in stdout


def test_trained_weights_are_not_flagged(small_sets: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        status, _, stderr = main_in_process(tiny_config(small_sets, tiny_checkpoint, tmp_path), tmp_path)
    assert status == 0, stderr[-3000:]
    assert "warnings" not in json.loads((_run_dir(tmp_path) / "ood_results.json").read_text())


def _zero_activations(x: torch.Tensor) -> torch.Tensor:
    """Every activation to 0: the logits are the classifier's bias, the same for every sample."""
    return x * 0


@pytest.fixture
def zero_shaping(monkeypatch: pytest.MonkeyPatch) -> str:
    """A shaping spec, ``zero_all``, registered for this test only, that makes every score of a run equal."""
    monkeypatch.setattr(SHAPINGS, "_entries", dict(SHAPINGS._entries))
    register_shaping("zero_all", description="every activation to 0")(lambda: _zero_activations)
    return "zero_all"


def test_shaping_that_makes_every_score_equal_warns_once_and_is_flagged_in_the_tables(
    zero_shaping: str,
    small_sets: dict[str, Path],
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    config = tiny_config(small_sets, tiny_checkpoint, tmp_path, shaping=[zero_shaping, "ash_s@90"])
    with pytest.warns(UserWarning, match="same score") as caught:
        status, stdout, stderr = main_in_process(config, tmp_path)
    assert status == 0, stderr[-3000:]
    (equal,) = [str(w.message) for w in caught if "same score" in str(w.message)]
    assert "zero_all + energy" in equal and "ash_s@90" not in equal and "removes every activation" in equal
    # Flagged in the results, not only in the log: the ranked table's row and its legend, JSON and CSV.
    run_dir = _run_dir(tmp_path)
    results = json.loads((run_dir / "ood_results.json").read_text())
    flags = {run["shaping"]: run["equal_id_scores"] for run in results["runs"]}
    assert flags == {"zero_all": True, "ash_s@90": False}
    assert results["flags"]["equal_id_scores"].startswith(f"{EQUAL_SCORES_FLAG} every ID test sample")
    csv_rows = (run_dir / "ood_results.csv").read_text().splitlines()
    assert csv_rows[0].endswith(",id_accuracy,equal_id_scores")
    assert {row.split(",")[0]: row.split(",")[-1] for row in csv_rows[1:]} == {"zero_all": "True", "ash_s@90": "False"}
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 0
    for table in (stdout, capsys.readouterr().out):  # main.py test's and main.py report's
        assert f"| zero_all | energy {EQUAL_SCORES_FLAG} |" in table and "| ash_s@90 | energy |" in table
        assert results["flags"]["equal_id_scores"] in table.splitlines()


# ------------------------------------------------------------------------------------------------------ report
def _store(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {
        "scores": rng.normal(size=(n, 1)),
        "targets": np.zeros(n, np.int64),
        "index": np.arange(n),
        "preds": np.zeros((n, 1), np.int64),
    }


@pytest.fixture
def saved_run(tmp_path: Path) -> Path:
    """A run directory whose scores.npz holds the ID set and OOD set ``far`` (a later set ``near`` is missing)."""
    meta = {
        "runs": [{"shaping": "ash_s@90", "score": "energy"}],
        "groups": {},
        "tpr": 0.95,
        "convention": "paper",
        "loaders": [{"name": "id", "role": "id"}, {"name": "far", "role": "ood"}, {"name": "near", "role": "ood"}],
    }
    save_scores(str(tmp_path / "scores.npz"), {"id": _store(40), "far": _store(30)}, meta)
    return tmp_path


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_an_archive", "another_npz"])
def test_report_on_an_unreadable_scores_file_is_one_error_line(
    damage: str, saved_run: Path, capsys: pytest.CaptureFixture
) -> None:
    path = saved_run / "scores.npz"
    raw = path.read_bytes()
    if damage == "another_npz":
        np.savez(path, x=np.zeros(3))
    else:
        path.write_bytes({"truncated": raw[: len(raw) // 2], "empty": b"", "not_an_archive": b"hello\n"}[damage])
    message = _one_error_line(main(["report", str(saved_run)]), capsys.readouterr().err)
    assert f"cannot read {str(path)!r} as a scores.npz" in message and "Fix:" in message


def test_report_overrides_tpr_and_convention(saved_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(saved_run), "--tpr", "0.9", "--convention", "openood"]) == 0
    out = capsys.readouterr().out
    assert "FPR90" in out and "convention openood" in out and "| far |" in out
    results = json.loads((saved_run / "ood_results.json").read_text())
    assert results["tpr"] == 0.9 and results["convention"] == "openood" and results["missing"] == ["near"]
    assert "fpr90" in results["runs"][0]["ood"]["far"]
    # The operating point is recomputed at the new TPR from the saved ID scores.
    id_scores = _store(40)["scores"][:, 0]
    assert results["runs"][0]["threshold"] == {"value": threshold_at_tpr(id_scores, 0.9), "tpr": 0.9, "set": "id"}
    assert np.mean(id_scores >= results["runs"][0]["threshold"]["value"]) >= 0.9


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--tpr", "1.5"], ("--tpr: 1.5", "(0, 1]")),
        (["--tpr", "0"], ("--tpr: 0.0", "(0, 1]")),
        (["--convention", "sklearn"], ("--convention: 'sklearn'", "'paper', 'openood'")),
        (["--tpr", "high"], ("--tpr", "invalid float value", "Usage:")),
        (["--bogus"], ("unrecognized", "--bogus")),
    ],
    ids=["tpr_above_one", "tpr_zero", "unknown_convention", "tpr_not_a_number", "unknown_flag"],
)
def test_report_bad_arguments_are_one_error_line(
    args: list[str], fragments: tuple[str, ...], saved_run: Path, capsys: pytest.CaptureFixture
) -> None:
    message = _one_error_line(main(["report", str(saved_run), *args]), capsys.readouterr().err)
    for fragment in fragments:
        assert fragment in message, message


def test_report_of_a_run_stopped_before_its_first_ood_set_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    meta = {
        "runs": [{"shaping": "none", "score": "energy"}],
        "groups": {},
        "tpr": 0.95,
        "convention": "paper",
        "loaders": [{"name": "id", "role": "id"}, {"name": "far", "role": "ood"}],
    }
    save_scores(str(tmp_path / "scores.npz"), {"id": _store(10)}, meta)
    message = _one_error_line(main(["report", str(tmp_path)]), capsys.readouterr().err)
    assert "stopped before its first OOD set was finished" in message and "rerun" in message


def test_internal_file_not_found_is_not_called_a_user_error() -> None:
    assert user_error(FileNotFoundError(2, "No such file or directory", "/tmp/some/cache/file")) is None


# ----------------------------------------------------------------------------------------------------- signals
def _start_and_signal(
    config: dict,
    tmp_path: Path,
    signum: signal.Signals,
    whole_group: bool,
) -> tuple[subprocess.CompletedProcess, Path]:
    """Start ``main.py test`` on ``config``; once its scores.npz holds the ID set and the first OOD set (``a``),
    send ``signum`` to it (or, as a terminal's Ctrl+C does, to its process group with the DataLoader workers)."""
    path = tmp_path / "signal.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "main.py"), "test", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
    )
    scores = _run_dir(tmp_path) / "scores.npz"
    try:
        while proc.poll() is None:
            if scores.is_file() and "a" in load_scores(str(scores))[0]:  # written atomically: never half read
                break
            time.sleep(0.05)
        (os.killpg if whole_group else os.kill)(proc.pid, signum)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), scores


@pytest.mark.parametrize(
    "signum, status, workers, whole_group",
    [(signal.SIGTERM, 143, 0, False), (signal.SIGINT, 130, 2, True)],
    ids=["sigterm", "ctrl_c_with_workers"],
)
def test_signal_stops_the_run_non_zero_with_finished_sets_reportable(
    signum: signal.Signals, status: int, workers: int, whole_group: bool, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    sets = {
        "id": write_npz(tmp_path / "id.npz", 8, 0),
        "dark": write_npz(tmp_path / "a.npz", 8, 1, 0.4),
        "bright": write_npz(tmp_path / "b.npz", 3000, 2, 1.6),
    }  # long enough to be stopped on
    config = tiny_config(sets, tiny_checkpoint, tmp_path)
    config["data"].update(
        ood={"a": _npz(sets["dark"]), "b": _npz(sets["bright"])}, groups={}, batch_size=8, num_workers=workers
    )
    proc, scores = _start_and_signal(config, tmp_path, signum, whole_group)
    assert proc.returncode == status, proc.stderr[-3000:]
    assert TRACEBACK not in proc.stderr and f"stopped by {signum.name}" in proc.stderr
    assert f"python main.py report {_run_dir(tmp_path)}" in proc.stderr  # logged by Lightning's rank_zero_info
    store, _ = load_scores(str(scores))
    assert {"id", "a"} <= set(store) and "b" not in store
    assert main(["report", str(_run_dir(tmp_path))]) == 0
    results = json.loads((_run_dir(tmp_path) / "ood_results.json").read_text())
    assert "a" in results["runs"][0]["ood"] and results["missing"] == ["b"]
