"""Wall time of a 16-setting sweep with ``model.feature_cache``: the first run (computes and stores the features)
against the cached re-run (reads them: no backbone pass, no image decoding), in one process.

Config: ``configs/cifar10_resnet20_ash_s.yaml`` as shipped (akamaster ResNet-20, batch 500, 2 data workers,
figures and result files written) with the grid ASH-P, ASH-B, ASH-S and SCALE at 4 percentiles each, and each
set limited to ``--limit`` random images. Each timed run is ``main.py test`` called in this process
(``ash_lightning.cli.app.main``: config parsing, model and checkpoint loading, weights fingerprint, the test loop,
result files), after an uncached warm-up run on 100 images per set; interpreter start-up and imports are not
timed. The script checks that both runs wrote the same ``ood_results.json`` and ``scores.npz``, and times the ID
set's test loader with images (decoded, transformed, collated) and without (the cached run's index-only batches).
Target: the cached re-run at least 10x faster than the first.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from ash_lightning.cli.app import main as cli_main
from ash_lightning.data import OODDataModule

from _common import (
    CIFAR10_CONFIG,
    ID_FILE,
    OOD_FILES,
    SWEEP_16,
    checkpoint_file,
    command_line,
    datasets_dir,
    machine_line,
    markdown_table,
    publish,
)

GRID = SWEEP_16
CONFIG = CIFAR10_CONFIG


def sweep_config(limit: int, cache: Path | None, out: Path) -> dict:
    """The shipped CIFAR-10 config with the grid, ``limit`` images per set, the cache and results under ``out``."""
    config = yaml.safe_load(CONFIG.read_text())
    config["model"].update(shaping=GRID, feature_cache=str(cache) if cache else None)
    data = config["data"]
    data["id"] = {**data["id"], "limit": limit}
    data["ood"] = {name: {**spec, "limit": limit} for name, spec in data["ood"].items()}
    config["trainer"]["logger"]["init_args"].update(save_dir=str(out), version="v")
    return config


def timed_run(config: dict, scratch: Path) -> tuple[float, Path]:
    """Seconds of one in-process ``main.py test`` and its result folder; exits on failure."""
    path = scratch / f"config_{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main(["test", "--config", str(path)])
    seconds = time.perf_counter() - start
    if status != 0:
        sys.exit(f"error: the run failed:\n{err.getvalue()[-2000:]}")
    logger = config["trainer"]["logger"]["init_args"]
    return seconds, Path(logger["save_dir"]) / logger["name"] / logger["version"]


def same_results(a: Path, b: Path) -> bool:
    """Whether two result folders hold the same ``ood_results.json`` and ``scores.npz``."""
    if json.loads((a / "ood_results.json").read_text()) != json.loads((b / "ood_results.json").read_text()):
        return False
    with np.load(a / "scores.npz") as x, np.load(b / "scores.npz") as y:
        return x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files)


def loader_seconds(config: dict) -> tuple[float, float, float]:
    """Seconds to iterate the ID set's test loader with images and without, and the MiB of images it yields."""
    datamodule = OODDataModule(**config["data"], backbone=config["model"]["backbone"])
    datamodule.setup("test")
    seconds, mib = [], 0.0
    for images in (True, False):
        loader = datamodule._loader(datamodule.sources[datamodule.loaders[0].name], "raise", images=images)
        start = time.perf_counter()
        mib = max(mib, sum(batch[0].numel() * batch[0].element_size() for batch in loader) / 2**20)
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1], mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=5000, help="images per data set (default 5000)")
    parser.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    args = parser.parse_args()
    datasets_dir([ID_FILE, *OOD_FILES.values(), checkpoint_file("cifar_resnet20")])
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        timed_run(sweep_config(100, None, scratch / "warmup"), scratch)
        cache = scratch / "cache"
        first, first_out = timed_run(sweep_config(args.limit, cache, scratch / "first"), scratch)
        cached, cached_out = timed_run(sweep_config(args.limit, cache, scratch / "cached"), scratch)
        equal = same_results(first_out, cached_out)
        with_images, without_images, mib = loader_seconds(sweep_config(args.limit, None, scratch))
        stored = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    sets = 1 + len(sweep_config(1, None, scratch)["data"]["ood"])
    ratio = first / cached
    rows = [
        ["first run (computes and stores the features)", f"{first:.2f}", "1.0x"],
        ["cached re-run (reads them)", f"{cached:.2f}", f"{ratio:.1f}x"],
    ]
    verdict = "meets" if ratio >= 10 else "MISSES"
    text = "\n".join(
        [
            "## Feature cache: first run vs cached re-run (feature_cache)",
            "",
            f"Generated by `{command_line()}` on {machine_line()}.",
            "",
            f"`configs/cifar10_resnet20_ash_s.yaml` (batch 500, 2 data workers, figures on) with a {len(GRID)}-setting "
            f"grid (ASH-P/B/S and SCALE at 65/75/85/90) and `model.feature_cache`, {sets} sets of at most "
            f"{args.limit} random images each; each run is `main.py test` in one process (interpreter start-up "
            "excluded), after a warm-up run. The cache held "
            f"{stored / 2**20:.1f} MiB. Result files of the two runs equal: {'yes' if equal else 'NO'}.",
            "",
            markdown_table(["run", "wall s", "speed-up"], rows),
            "",
            f"cached re-run / first run: {ratio:.1f}x faster ({verdict} the >= 10x target)",
            "",
            "What the cached re-run still does: parse the config, build the model and load the .npz arrays, apply the "
            "16 heads to every batch, write the result files and figures. On a shared machine its time, and so the "
            "ratio, varies with the other jobs' load.",
            "",
            f"The ID set's test loader alone ({args.limit} images): {with_images:.2f} s with images ({mib:.0f} MiB of "
            f"tensors decoded and collated), {without_images:.3f} s without (the index-only batches of a cached set).",
        ]
    )
    publish("feature_cache", text, args.write)


if __name__ == "__main__":
    main()
