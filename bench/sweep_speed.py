"""Wall time of a 16-setting sweep in one run against one setting, and against the settings run one by one.

Grid: ASH-P, ASH-B, ASH-S and SCALE at 4 percentiles each, energy score, on the CIFAR-10 ResNet-20 config
(a subset of each set) when $DATASETS (default ../shared/data) holds the real data, else on random arrays of
the same shapes. Each measurement is ``Trainer.test`` in this process, after a warm-up run.
Target: the grid costs <= 1.3x one setting.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from ash_lightning.callbacks import OODMetricsCallback
from ash_lightning.data import OODDataModule
from ash_lightning.module import OODEvalModule

REPO = Path(__file__).resolve().parents[1]
GRID = [f"{variant}@{p}" for variant in ("ash_p", "ash_b", "ash_s", "scale") for p in (65, 75, 85, 90)]


def data_specs(limit: int, scratch: Path) -> tuple[dict, dict, str | None]:
    """ID spec, OOD specs and checkpoint: the real CIFAR-10 benchmark, or random arrays of its shapes."""
    root = Path(os.environ.get("DATASETS", REPO.parent / "shared" / "data"))
    if (root / "cifar10_test_jpeg.npz").is_file():
        ood = {
            n: {"kind": "npz", "path": str(root / f), "limit": limit}
            for n, f in (
                ("textures", "dtd_subset10_resize32.npz"),
                ("mnist", "mnist_test.npz"),
                ("fashionmnist", "fashionmnist_test.npz"),
                ("tinyimagenet", "tinyimagenet_resize32_test.npz"),
            )
        }
        return (
            {"kind": "npz", "path": str(root / "cifar10_test_jpeg.npz"), "limit": limit},
            ood,
            str(root / "checkpoints" / "akamaster_resnet20-12fca82f.th"),
        )
    print(f"no real data under {root}: using random arrays of the same shapes")
    rng = np.random.default_rng(0)
    specs = {}
    for name in ("id", "textures", "mnist", "fashionmnist", "tinyimagenet"):
        path = scratch / f"{name}.npz"
        np.savez(path, x=rng.integers(0, 256, (limit, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, limit))
        specs[name] = {"kind": "npz", "path": str(path)}
    return specs.pop("id"), specs, None


def timed_test(
    shaping: str | list[str], id_spec: dict, ood: dict, checkpoint: str | None, out: Path, batch_size: int
) -> float:
    """Seconds of one ``Trainer.test`` over all sets (model and data built outside the timed region)."""
    module = OODEvalModule("cifar_resnet20", checkpoint_path=checkpoint, shaping=shaping, score="energy")
    data = OODDataModule(id=id_spec, ood=ood, backbone="cifar_resnet20", batch_size=batch_size, num_workers=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[OODMetricsCallback(output_dir=str(out), log_figures=False)],
    )
    start = time.perf_counter()
    trainer.test(module, datamodule=data, verbose=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=1000, help="samples per data set")
    parser.add_argument("--batch-size", type=int, default=250)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        id_spec, ood, checkpoint = data_specs(args.limit, scratch)
        run = lambda shaping: timed_test(shaping, id_spec, ood, checkpoint, scratch / "out", args.batch_size)  # noqa: E731
        run("ash_s@90")  # warm-up: caches, allocator, thread pools
        single = min(run("ash_s@90") for _ in range(2))
        grid = min(run(GRID) for _ in range(2))
        one_by_one = sum(run(spec) for spec in GRID)
    n = args.limit * (1 + len(ood))
    print(f"\n{n} images per run (5 sets x {args.limit}), batch {args.batch_size}, cifar_resnet20, CPU\n")
    print("| what | settings | wall s | vs one setting |\n|---|---:|---:|---:|")
    print(f"| one setting (ash_s@90) | 1 | {single:.2f} | 1.00x |")
    print(f"| grid in one run | {len(GRID)} | {grid:.2f} | {grid / single:.2f}x |")
    print(f"| grid, setting by setting | {len(GRID)} | {one_by_one:.2f} | {one_by_one / single:.2f}x |")
    verdict = "meets" if grid / single <= 1.3 else "MISSES"
    print(
        f"\ngrid / one setting = {grid / single:.3f} ({verdict} the <= 1.3 target); "
        f"one run is {one_by_one / grid:.1f}x faster than setting by setting"
    )


if __name__ == "__main__":
    main()
