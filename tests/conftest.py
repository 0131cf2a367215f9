"""Shared fixtures: small synthetic .npz data sets, a saved random-weight checkpoint, the real-data folder."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``$DATASETS`` or ``../shared/data`` when it holds the benchmark arrays, else None."""
    for candidate in (os.environ.get("DATASETS"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "cifar10_test_jpeg.npz").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data absent: set DATASETS or place the benchmark in ../shared/data")
    return path


@pytest.fixture
def lightning_log() -> Iterator[list[str]]:
    """The messages Lightning's ``rank_zero_info`` logs while the test runs (its handler writes to the stderr of
    the process as it was when Lightning was imported, which capsys cannot see)."""
    from lightning_utilities.core import rank_zero

    from ash_lightning.lightning_packages import installed_packages

    installed_packages()  # each package, when imported, points rank_zero.log at its own logger: import them first
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    # Whichever of these rank_zero_info writes to (none is another's ancestor, so each record is collected once).
    names = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero")
    loggers = {rank_zero.log, *map(logging.getLogger, names)}
    handler = Collect()
    for logger in loggers:
        logger.addHandler(handler)
    yield messages
    for logger in loggers:
        logger.removeHandler(handler)


def write_npz(path: Path, n: int, seed: int, brightness: float = 1.0, size: int = 32) -> Path:
    """A uint8 N×size×size×3 image array with labels 0..9, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    x = np.clip(rng.normal(127 * brightness, 60, size=(n, size, size, 3)), 0, 255).astype(np.uint8)
    np.savez(path, x=x, y=rng.integers(0, 10, size=n))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ID (101 samples) and two OOD sets (67, 53): sizes divisible neither by 2 nor by common batch sizes."""
    root = tmp_path_factory.mktemp("tiny_data")
    return {
        "id": write_npz(root / "id.npz", 101, 0),
        "dark": write_npz(root / "dark.npz", 67, 1, 0.4),
        "bright": write_npz(root / "bright.npz", 53, 2, 1.6),
    }


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight cifar_resnet20 state_dict saved like the akamaster files (``module.`` prefix)."""
    import timm

    import ash_lightning.models  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet20")
    path = tmp_path_factory.mktemp("ckpt") / "resnet20_random.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def tiny_config(tiny_data: dict[str, Path], checkpoint: Path, out: Path, **model: object) -> dict:
    """A main.py config over the tiny data sets, logging under ``out``."""
    return {
        "seed_everything": 0,
        "model": {
            "backbone": "cifar_resnet20",
            "checkpoint_path": str(checkpoint),
            "shaping": "ash_s@90",
            "score": "energy",
            **model,
        },
        "data": {
            "id": {"kind": "npz", "path": str(tiny_data["id"])},
            "ood": {
                "dark": {"kind": "npz", "path": str(tiny_data["dark"])},
                "bright": {"kind": "npz", "path": str(tiny_data["bright"])},
            },
            "groups": {"near": ["dark"], "far": ["bright"]},
            "batch_size": 16,
            "num_workers": 0,
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(out), "name": "run", "version": "v"},
            },
        },
    }


def run_main(
    config: dict, tmp_path: Path, *extra: str, env: dict | None = None, command: str = "test"
) -> subprocess.CompletedProcess:
    """``python main.py test --config <config>`` in a subprocess; returns the completed process."""
    cfg = tmp_path / f"config_{abs(hash(str(config))) % 10**8}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, str(REPO / "main.py"), command, "--config", str(cfg), *extra],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def write_image_folder(folder: Path, n: int, seed: int, truncated: tuple[str, ...] = ()) -> list[Path]:
    """``n`` decodable 32×32 images in ``folder`` (PNG and JPEG alternately) plus one JPEG cut to a third of its
    bytes per name in ``truncated``; returns the truncated files' paths."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        image.save(folder / f"img{i:03d}.{'jpg' if i % 2 else 'png'}")
    bad = []
    for name in truncated:
        jpeg = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
        (folder / name).write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 3])
        bad.append(folder / name)
    return bad


def main_in_process(config: dict, tmp_path: Path, *extra: str) -> tuple[int, str, str]:
    """``ash_lightning.cli.app.main(["test", "--config", <config>, *extra])`` in this process, which spares the
    interpreter start-up of ``run_main``: returns (exit status, stdout, stderr)."""
    from ash_lightning.cli.app import main

    cfg = tmp_path / f"config_inproc_{abs(hash(str(config))) % 10**8}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["test", "--config", str(cfg), *extra])
    return status, out.getvalue(), err.getvalue()
