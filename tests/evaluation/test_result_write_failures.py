"""Results on a full disk: a write of ``scores.npz``, ``ood_results.json``/``.csv``, a figure or TensorBoard events
that fails with ENOSPC ends the run in one error naming the folder and the fix, without a traceback; what was
written before stays readable and a set's scores are never half-written (``tests/full_disk.py`` fills the disk)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from ash_lightning.callbacks import OODMetricsCallback
from ash_lightning.cli.app import main
from ash_lightning.cli.exit_codes import user_error
from ash_lightning.errors import UserError
from ash_lightning.evaluation.score_store import load_scores
from tests.conftest import REPO, main_in_process, run_main, tiny_config, write_npz
from tests.full_disk import fill_disk

TRACEBACK = "Traceback (most recent call last)"


class _Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)


def _data(shift: float, n: int = 24) -> TensorDataset:
    g = torch.Generator().manual_seed(int(shift * 10))
    return TensorDataset(torch.randn(n, 4, generator=g) + shift, torch.zeros(n, dtype=torch.long))


class _FillDiskAtEpochEnd(pl.Callback):
    """Fills the disk when the test epoch ends, before ``OODMetricsCallback`` (listed after it) writes anything."""

    def __init__(self, fill: Callable[[], Callable[[], None]]) -> None:
        self.fill, self.undo = fill, None

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.undo = self.fill()


def _evaluate(tmp_path: Path, fault: tuple[str, str, int, bool]) -> tuple[UserError, Path]:
    """Test ``_Linear`` with OOD sets ``far`` and ``near`` and a TensorBoard logger whose folder ``D`` gets every
    file, the disk filling up at ``fault`` = (folder relative to ``D``, file name pattern, files written before,
    at the epoch's end or from the start); the UserError behind what ``trainer.test`` raised, and ``D``."""
    folder, pattern, skip, at_epoch_end = fault
    logger = TensorBoardLogger(str(tmp_path), name="tb", version="v", default_hp_metric=False)
    run_dir = Path(logger.log_dir)
    fill = lambda: fill_disk(run_dir / folder, pattern, skip)  # noqa: E731
    filler = _FillDiskAtEpochEnd(fill)
    metrics = OODMetricsCallback(ood={"far": _data(3.0), "near": _data(0.5)}, verbose=False)
    trainer = pl.Trainer(
        logger=logger,
        callbacks=[filler, metrics] if at_epoch_end else [metrics],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    undo = None if at_epoch_end else fill()
    try:
        with pytest.raises(Exception) as raised:  # noqa: PT011 (the UserError, or a flush error on top of it)
            trainer.test(_Linear(), dataloaders=DataLoader(_data(0.0), batch_size=8), verbose=False)
    finally:
        for done in (undo, filler.undo):
            if done is not None:
                done()
    error = user_error(raised.value)
    assert error is not None, repr(raised.value)
    return error, run_dir


# (case, (folder under D, file pattern, files written first, from the epoch's end), the sets in scores.npz after)
FAULTS = [
    ("scores_of_the_last_set", (".", ".scores.npz.*", 2, False), ["far", "id"]),
    ("ood_results_json", (".", ".ood_results.json.*", 0, False), ["far", "id", "near"]),
    ("ood_results_csv", (".", ".ood_results.csv.*", 0, False), ["far", "id", "near"]),
    ("curves_png", (".", ".curves.png.*", 0, False), ["far", "id", "near"]),
    ("tensorboard_run_events", (".", "events.out.tfevents.*", 0, True), ["far", "id", "near"]),
    ("tensorboard_session_events", ("hparams/none+energy", "*", 0, False), ["far", "id", "near"]),
]


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # a writer thread's traceback
@pytest.mark.parametrize("fault, saved", [c[1:] for c in FAULTS], ids=[c[0] for c in FAULTS])
def test_a_result_write_on_a_full_disk_is_one_error_naming_the_folder_and_keeps_what_was_written(
    fault: tuple[str, str, int, bool], saved: list[str], tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    old = {"ood_results.json": '{"from": "an earlier run"}\n', "ood_results.csv": "shaping,score\n"}
    run_dir = tmp_path / "tb" / "v"
    run_dir.mkdir(parents=True)
    for name, text in old.items():
        (run_dir / name).write_text(text)
    error, run_dir = _evaluate(tmp_path, fault)
    message = str(error)
    folder = os.path.normpath(run_dir / fault[0])
    assert "\n" not in message and message.startswith("cannot write ")
    assert f"{folder!r}" in message or f"{str(run_dir)!r}" in message, message
    assert "no space left on the disk (ENOSPC). Fix: free space" in message and "ood_metrics.output_dir" in message
    err = capfd.readouterr().err
    assert TRACEBACK not in err and "Exception in thread" not in err, err[-3000:]
    # Nothing half-written: scores.npz holds the sets saved before, each whole; results are the old or new files.
    store, _ = load_scores(str(run_dir))
    assert sorted(store) == saved and all(len(store[name]["index"]) == 24 for name in saved)
    json_text, csv_text = (run_dir / "ood_results.json").read_text(), (run_dir / "ood_results.csv").read_text()
    assert json_text == old["ood_results.json"] or json.loads(json_text)["counts"]["near"] == 24
    assert csv_text == old["ood_results.csv"] or "none,energy,near," in csv_text
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_report_on_a_full_disk_prints_the_table_then_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    error, run_dir = _evaluate(tmp_path, FAULTS[0][1])  # scores of far and id saved, near missing
    assert "'near'" in str(error)
    capsys.readouterr()
    undo = fill_disk(run_dir, ".ood_results.json.*")
    try:
        status = main(["report", str(run_dir)])
    finally:
        undo()
    out, err = capsys.readouterr()
    assert status == 2 and TRACEBACK not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"cannot write ood_results.json/.csv to {str(run_dir)!r}: no space left on the disk" in line
    assert "Fix: free space on that disk" in line and "main.py report on the copy" in line
    assert "| far |" in out  # the table was printed before the write failed
    assert main(["report", str(run_dir)]) == 0  # with space again, the same scores give the files


def test_main_py_test_on_a_full_disk_exits_2_with_one_error_line_and_the_finished_sets_saved(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A ``main.py test`` subprocess whose run folder fills up when the third set's scores are saved (the sets go
    id, bright, dark: the config's OOD sets in key order)."""
    data = {
        "id": write_npz(tmp_path / "id.npz", 6, 0),
        "dark": write_npz(tmp_path / "dark.npz", 5, 1, 0.4),
        "bright": write_npz(tmp_path / "bright.npz", 5, 2, 1.6),
    }
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(REPO / "tests" / "full_disk.py", site / "sitecustomize.py")
    run_dir = tmp_path / "run" / "v"
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        "FULL_DISK_FOLDER": str(run_dir),
        "FULL_DISK_PATTERN": ".scores.npz.*",
        "FULL_DISK_SKIP": "2",
        "ASH_DEBUG": "",
    }
    proc = run_main(tiny_config(data, tiny_checkpoint, tmp_path), tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert TRACEBACK not in proc.stderr + proc.stdout
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert f"cannot write the scores of data set 'dark' (scores.npz) to {str(run_dir)!r}" in line
    assert "no space left on the disk (ENOSPC). Fix:" in line
    assert f"python main.py report {run_dir}" in proc.stderr  # what the saved sets still give
    store, _ = load_scores(str(run_dir))
    assert sorted(store) == ["bright", "id"] and len(store["bright"]["index"]) == 5
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".scores")]


def test_main_py_on_a_full_disk_at_its_first_write_names_config_yaml_and_the_run_folder(
    tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ASH_DEBUG", raising=False)
    run_dir = tmp_path / "run" / "v"
    undo = fill_disk(run_dir, "config.yaml")
    try:
        status, stdout, stderr = main_in_process(tiny_config(tiny_data, tiny_checkpoint, tmp_path), tmp_path)
    finally:
        undo()
    assert status == 2 and TRACEBACK not in stderr, stderr[-3000:]
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert f"cannot write config.yaml to {str(run_dir)!r}: no space left on the disk (ENOSPC)" in line
    assert "trainer.logger's save_dir" in line and "| **mean** |" not in stdout


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_any_disk_full_or_read_only_write_is_a_user_error_naming_the_file(code: int) -> None:
    failed = OSError(code, os.strerror(code), "/scratch/run/hparams.yaml")
    try:
        try:
            raise failed
        except OSError as err:
            raise ValueError("a library's own wrapper") from err
    except ValueError as wrapped:
        error = user_error(wrapped)
    assert error is not None and str(error).startswith("cannot write 'hparams.yaml' to '/scratch/run': ")
    assert f"({errno.errorcode[code]}). Fix: " in str(error)
    # A file that cannot be read is not a write failure: the caller names it, or it is a bug with its traceback.
    assert user_error(PermissionError(errno.EACCES, "Permission denied", "/data/x.npz")) is None


def test_in_a_users_script_a_flush_failing_after_the_error_still_shows_the_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Lightning flushes the loggers after an error: on the same full disk that raises again, on top of the
    UserError; the callbacks' ``sys.excepthook`` prints the UserError's line, not the flush's traceback."""
    from ash_lightning.callbacks.brief_errors import show_user_errors_briefly

    others: list[BaseException] = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, tb: others.append(error))
    show_user_errors_briefly()
    try:
        try:
            raise UserError("cannot write TensorBoard events to '/run': no space left on the disk (ENOSPC). Fix: x")
        except UserError:
            raise OSError(errno.ENOSPC, "No space left on device") from None
    except OSError as flush:
        flush.__suppress_context__ = False  # as Lightning's finalize raises it: the UserError is its context
        sys.excepthook(type(flush), flush, flush.__traceback__)
    assert capsys.readouterr().err.startswith("UserError: cannot write TensorBoard events") and not others
    sys.excepthook(ValueError, ValueError("a bug"), None)
    assert len(others) == 1  # anything else keeps its traceback
