"""The benchmark scripts import (a broken import fails here, it is not skipped), and the throughput benchmark's
bookkeeping: interleaved slots stay aligned across the three loops, steady state leaves out every dataloader's
first and last batch, and the script runs end to end (speed is not asserted)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from ash_lightning.data import OODDataModule
from ash_lightning.module import OODEvalModule

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import throughput  # noqa: E402  (bench/ is not a package: its scripts import each other by file name)

SCRIPTS = sorted(path.stem for path in (REPO / "bench").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_imports(script: str) -> None:
    module = importlib.import_module(script)
    assert script.startswith("_") or callable(getattr(module, "main", None))


@pytest.fixture(scope="module")
def tiny_setup(tiny_data: dict[str, Path]) -> tuple[OODEvalModule, OODDataModule, throughput.Runtime]:
    module = OODEvalModule("cifar_resnet20", shaping="ash_s@90")
    datamodule = OODDataModule(
        id={"kind": "npz", "path": str(tiny_data["id"])},
        ood={"dark": {"kind": "npz", "path": str(tiny_data["dark"])}},
        backbone="cifar_resnet20",
        batch_size=16,
        num_workers=0,
    )
    datamodule.setup("test")
    return module, datamodule, throughput.Runtime(torch.device("cpu"), bf16=False)


def test_interleaved_slots_align_and_skip_first_and_last_batches(tiny_setup) -> None:
    module, datamodule, runtime = tiny_setup
    with tempfile.TemporaryDirectory() as log_dir:
        batches = throughput.interleaved_pass(module, datamodule, runtime, "ash_s@90", log_dir)
    steady = (7 - 2) + (5 - 2)  # 101 ID and 67 OOD samples in batches of 16: 7 and 5 batches
    assert {loop: len(b.per_image) for loop, b in batches.items()} == dict.fromkeys(throughput.LOOPS, steady)
    for b in batches.values():
        assert all(0 < outside < total for total, outside in zip(b.per_image, b.outside_forward, strict=True))


def test_separate_passes_count_the_same_steady_batches(tiny_setup) -> None:
    module, datamodule, runtime = tiny_setup
    with tempfile.TemporaryDirectory() as log_dir:
        ours = throughput.lightning_pass(module, datamodule, runtime, log_dir)
    plain = throughput.plain_pass(module.model, datamodule, runtime, "ash_s@90")
    assert len(ours.batches.per_image) == len(plain.batches.per_image) == 8
    assert ours.end_to_end > 0 and plain.end_to_end > 0


def test_script_prints_its_tables_without_writing() -> None:
    before = (REPO / "BENCHMARKS.md").read_text()
    done = subprocess.run(
        [
            sys.executable,
            "bench/throughput.py",
            "--settings",
            "resnet50",
            "--images",
            "6",
            "--batch-size",
            "2",
            "--num-workers",
            "0",
            "--interleaved",
            "1",
            "--repeats",
            "1",
            "--no-write",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| resnet50 | 2 | 2 |" in done.stdout  # batch 2, one interleaved pass: one steady slot per set
    assert "ours ÷ plain + hook (≥ 0.95)" in done.stdout and "hook alone ÷ plain batch time" in done.stdout
    assert (REPO / "BENCHMARKS.md").read_text() == before
