"""Helpers shared by the benchmark scripts: where the real data lives, its data set specs, the machine
description, Markdown tables and the regenerated sections of ``BENCHMARKS.md``.

Data is found through ``$DATASETS`` (default ``../shared/data`` next to the repository); specs keep the
literal ``$DATASETS/...`` so generated configs stay portable, and ``datasets_dir`` exports the variable.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "BENCHMARKS.md"
DEFAULT_DATASETS = REPO.parent / "shared" / "data"

ID_FILE = "cifar10_test_jpeg.npz"
TRAIN_FILE = "cifar10_train_kaggle200_png.npz"
OOD_FILES = {
    "textures": "dtd_subset10_resize32.npz",
    "mnist": "mnist_test.npz",
    "fashionmnist": "fashionmnist_test.npz",
    "tinyimagenet": "tinyimagenet_resize32_test.npz",
}
#: The 16-setting sweep the speed benchmarks time: ASH-P/B/S and SCALE at four percentiles.
SWEEP_16 = [f"{variant}@{p}" for variant in ("ash_p", "ash_b", "ash_s", "scale") for p in (65, 75, 85, 90)]
#: The CIFAR-10 config the end-to-end benchmarks run.
CIFAR10_CONFIG = REPO / "configs" / "cifar10_resnet20_ash_s.yaml"
GROUPS = {"near": ["tinyimagenet", "textures"], "far": ["mnist", "fashionmnist"]}
CHECKPOINTS = {
    "cifar_resnet20": "akamaster_resnet20-12fca82f.th",
    "cifar_resnet32": "akamaster_resnet32-d509ac18.th",
    "cifar_resnet44": "akamaster_resnet44-014dd654.th",
    "cifar_resnet56": "akamaster_resnet56-4bfd9763.th",
}


def datasets_dir(files: Sequence[str]) -> Path:
    """The data folder (``$DATASETS``, else ``../shared/data``) holding ``files`` (relative paths), exported as
    ``$DATASETS`` so that ``$DATASETS/...`` specs resolve; exits with a message naming what is missing."""
    root = Path(os.environ.get("DATASETS") or DEFAULT_DATASETS).expanduser().resolve()
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        sys.exit(
            f"error: benchmark data not found: {', '.join(missing)} missing under {root}.\n"
            "Fix: set DATASETS to the folder holding the .npz files and checkpoints/ "
            f"(see its SOURCES.md), e.g. DATASETS=/path/to/data python {' '.join(map(shlex.quote, sys.argv))}"
        )
    os.environ["DATASETS"] = str(root)
    return root


def npz_spec(file: str, **extra: Any) -> dict[str, Any]:
    """A data set spec for ``$DATASETS/<file>``; ``extra`` adds keys such as ``name`` or ``limit``."""
    return {"kind": "npz", "path": f"$DATASETS/{file}", **extra}


def checkpoint_file(backbone: str) -> str:
    """The checkpoint of a CIFAR ResNet, relative to the data folder; exits for other backbones."""
    if backbone not in CHECKPOINTS:
        sys.exit(f"error: no CIFAR-10 checkpoint for {backbone!r}; choose from {sorted(CHECKPOINTS)}.")
    return f"checkpoints/{CHECKPOINTS[backbone]}"


def machine_line() -> str:
    """Date, CPU/GPU, thread count and library versions, for the header of a generated section."""
    import pytorch_lightning as pl
    import timm

    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU only ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads)"
    )
    return (
        f"{datetime.date.today().isoformat()}, {device}; Python {platform.python_version()}, torch "
        f"{torch.__version__}, pytorch-lightning {pl.__version__}, timm {timm.__version__}"
    )


def command_line() -> str:
    """The command that ran this script, with the data folder as ``DATASETS=<path relative to the repository>``
    when it sits beside the repository (``../shared/data``), else as ``DATASETS=/path/to/data``: no machine's
    absolute paths in BENCHMARKS.md."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    data = Path(os.environ.get("DATASETS") or DEFAULT_DATASETS).expanduser().resolve()
    shown = os.path.relpath(data, REPO) if data.is_relative_to(REPO.parent) else "/path/to/data"
    return " ".join(["DATASETS=" + shlex.quote(shown), ".venv/bin/python", script, *map(shlex.quote, sys.argv[1:])])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align`` has one character per column, ``l`` or ``r`` (default: first left)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    return "\n".join("| " + " | ".join(map(str, cells)) + " |" for cells in (header, rule, *rows))


def pct(value: float | None, digits: int = 2) -> str:
    """A fraction as a percentage string; an em dash for None."""
    return "—" if value is None else f"{100 * value:.{digits}f}"


def publish(section: str, text: str, write: bool) -> None:
    """Print ``text`` and, with ``write``, put it between the ``section`` markers of BENCHMARKS.md
    (appended at the end when the markers are absent), leaving every other section untouched."""
    print(text)
    if not write:
        return
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    current = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    updated = (
        pattern.sub(lambda _: block, current)
        if pattern.search(current)
        else current.rstrip("\n") + "\n\n" + block + "\n"
    )
    BENCHMARKS.write_text(updated)
    print(f"\nwritten to {BENCHMARKS.relative_to(REPO)} between the '{section}' markers")


def interleaved_medians(
    timers: Mapping[str, Callable[[], object]], rounds: int, with_gradients: Sequence[str] = ()
) -> dict[str, float]:
    """Median seconds per call of each timer over ``rounds`` rounds that call every timer in turn, after one
    warm-up round; timers named in ``with_gradients`` run outside ``torch.inference_mode``, the others inside."""
    times: dict[str, list[float]] = {name: [] for name in timers}
    for round_ in range(rounds + 1):
        for name, timer in timers.items():
            with torch.inference_mode(name not in with_gradients):
                start = time.perf_counter()
                timer()
                elapsed = time.perf_counter() - start
            if round_:  # round 0 warms up
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}
