"""``main.py test`` with ``data.fit`` and ``model.feature_cache``: each fit pass (calibration, the detectors' fit) and
each test set's feature-cache build of a run whose output is a log (not a terminal) writes exactly one line naming
what runs, its batches and a rate; without the trainer's progress bar, none."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import main_in_process, run_main, tiny_config

# data.fit: the first 48 of the 101 ID samples, in batches of 16
PASSES = ("fit react@p90 on data.fit", "fit knn@5 under none, react@p90 on data.fit")
LINE = re.compile(r"^(?P<what>fit .* on data\.fit): 3/3 batches in \d+\.\ds \(\d+\.\d batches/s\)$")
# the tiny sets: ID 101 samples, dark 67, bright 53
BUILD = re.compile(r"^test \w+ and cache its features \((?P<samples>\d+) samples\): \d+ batches in \d+\.\ds \(")


def _config(tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path, progress_bar: bool) -> dict:
    config = tiny_config(
        tiny_data, tiny_checkpoint, tmp_path / "out", shaping=["none", "react@p90"], score=["energy", "knn@5"]
    )
    config["data"]["fit"] = {"kind": "npz", "path": str(tiny_data["id"]), "limit": 48}
    config["model"]["feature_cache"] = str(tmp_path / "features")
    config["trainer"]["enable_progress_bar"] = progress_bar
    return config


def _pass_lines(output: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]", output) if line.startswith(("fit ", "test "))]


def test_a_log_gets_one_line_per_fit_pass(tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path) -> None:
    proc = run_main(
        _config(tiny_data, tiny_checkpoint, tmp_path, True), tmp_path, env={"ASH_CACHE_DIR": str(tmp_path / "c")}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _pass_lines(proc.stdout + proc.stderr)
    assert [LINE.match(line)["what"] for line in lines if LINE.match(line)] == list(PASSES), lines
    builds = sorted(int(m["samples"]) for m in map(BUILD.match, lines) if m)
    assert builds == [53, 67, 101], lines
    assert len(lines) == len(PASSES) + 3, lines
    rerun = run_main(  # everything is cached now: no pass, no build
        _config(tiny_data, tiny_checkpoint, tmp_path, True), tmp_path, env={"ASH_CACHE_DIR": str(tmp_path / "c")}
    )
    assert rerun.returncode == 0 and _pass_lines(rerun.stdout + rerun.stderr) == [], rerun.stderr[-3000:]


def test_without_the_progress_bar_no_line(
    tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASH_CACHE_DIR", str(tmp_path / "c"))
    status, out, err = main_in_process(_config(tiny_data, tiny_checkpoint, tmp_path, False), tmp_path)
    assert status == 0, err[-3000:]
    assert _pass_lines(out + err) == []
    assert (tmp_path / "c" / "detectors").is_dir()  # the passes ran (their fits were cached)
    assert len(list((tmp_path / "features").iterdir())) == 3  # and so did the builds
