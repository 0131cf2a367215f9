"""The command line as a user meets it: quiet output ending with the results table, --verbose bringing
Lightning's lines back, the command list, report's usage, and one error line for the training commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, main_in_process, tiny_config


def _main(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python main.py *args`` with stderr merged into stdout, in the order a terminal shows them."""
    return subprocess.run(
        [sys.executable, str(REPO / "main.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_test_run_is_quiet_and_ends_with_the_results_table(
    tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_data, tiny_checkpoint, tmp_path)))
    quiet = _main("test", "--config", str(config), cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stdout[-3000:]
    lines = [line for line in quiet.stdout.splitlines() if line.strip()]
    assert not [line for line in lines if "Tip:" in line or "available:" in line or "litlogger" in line]
    assert lines[-1].startswith("Results: ") and lines[-2].startswith("| **mean** |")
    assert lines[0].startswith("### ash_s@90 + energy")  # nothing before the table


def test_verbose_keeps_lightnings_lines_and_quiet_drops_only_those(
    monkeypatch: pytest.MonkeyPatch, lightning_log: list[str]
) -> None:
    from pytorch_lightning.utilities.rank_zero import rank_zero_info

    from ash_lightning.cli.app import global_flags
    from ash_lightning.cli.logs import VERBOSE_ENV, quiet_unless_verbose

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["main.py", "test", "--verbose", "--debug"])
    try:
        quiet_unless_verbose(False)
        rank_zero_info("GPU available: False, used: False")
        rank_zero_info("💡 Tip: try installing litlogger")
        rank_zero_info("Restoring states from the checkpoint path")
        assert lightning_log == ["Restoring states from the checkpoint path"]
        # both flags leave the arguments and sys.argv (which DDP launchers re-run) in one place
        assert global_flags(["test", "--verbose", "--debug"]) == (["test"], {"--verbose", "--debug"})
        assert sys.argv == ["main.py", "test"]
        quiet_unless_verbose(True)
        rank_zero_info("GPU available: False, used: False")
        assert lightning_log[-1] == "GPU available: False, used: False"
    finally:
        monkeypatch.delenv(VERBOSE_ENV, raising=False)
        quiet_unless_verbose(False)


def test_help_lists_the_commands_one_line_each() -> None:
    proc = _main("--help")
    assert proc.returncode == 0
    commands = [line.split()[0] for line in proc.stdout.split("commands:\n")[1].split("\n\n")[0].splitlines()]
    assert commands == ["test", "predict", "report", "list"]


def test_report_help_prints_its_usage(capsys: pytest.CaptureFixture[str]) -> None:
    from ash_lightning.cli.app import main

    assert main(["report", "--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: main.py report <run directory | scores.npz>") and not err


def test_training_commands_end_in_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    from ash_lightning.cli.app import main

    proc = _main("fit", "--config", "configs/cifar10_resnet20_ash_s.yaml")
    assert proc.returncode == 2
    (line,) = proc.stdout.splitlines()
    assert line.startswith("error: `main.py fit` is not available") and "Trainer.fit" in line
    assert main(["validate"]) == 2
    out, err = capsys.readouterr()
    assert not out and err.startswith("error: `main.py validate` is not available") and err.count("\n") == 1


def test_only_the_command_being_run_gets_a_parser(
    tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LightningCLI builds a parser per command it lists (about 0.15 s each): ``main.py test`` builds test's alone."""
    from pytorch_lightning.cli import LightningCLI

    built: list[str] = []
    prepare = LightningCLI._prepare_subcommand_parser

    def counted(self: LightningCLI, klass: type, subcommand: str, **kwargs: object) -> object:
        built.append(subcommand)
        return prepare(self, klass, subcommand, **kwargs)

    monkeypatch.setattr(LightningCLI, "_prepare_subcommand_parser", counted)
    config = tiny_config(tiny_data, tiny_checkpoint, tmp_path)
    config["model"]["bogus_key"] = 1  # parsed, then refused: no run needed
    status, _, err = main_in_process(config, tmp_path)
    assert status == 2 and "'model.bogus_key'" in err
    assert built == ["test"]
