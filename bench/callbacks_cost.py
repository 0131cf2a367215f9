"""Benchmark: what the callbacks cost inside a user's own Lightning project.

Two figures, each from interleaved rounds (one run of every loop per round, after one warm-up round; medians):

Ratios are taken within each round (the runs of a round follow each other) and their median is reported; the
table's seconds and images per second are medians over the rounds. torch runs on one thread by default: on a
shared CPU, a multi-threaded convolution stalls whenever another process holds a core, which swamps the
differences measured here.

* **ID overhead**: the seconds of the user's own test loop over the ID set (first batch start to last batch end)
  with ``OODMetricsCallback`` (logits from the forward hook, energy, accumulation) against the same loop without
  it. Target: at most 3% more. Whole runs on a shared CPU differ by more than that from run to run, so the
  seconds spent inside the callback's batch hooks (all of its per-batch work; its forward hooks only keep a
  reference) are timed too, as a share of the loop: that estimate has the resolution for the target.
* **OOD throughput**: images per second of the callback scoring its ``ood=`` sets after the user's loop
  (``ActivationShapingCallback("ash_s@90")`` attached) against ``main.py test``'s loop over the same sets
  (``OODEvalModule`` + ``OODDataModule``, ``ash_s@90`` + energy), both from the end of the ID set to the end of
  the last OOD set (data loading, forward, scoring, saving each set). Target: at least 0.95x.

The user's module is a CIFAR ResNet-20 (akamaster weights) whose ``test_step`` logs its loss and accuracy and
returns nothing; the data are ``$DATASETS``'s CIFAR-10 test set (ID) and textures + MNIST (OOD), each limited
to ``--images`` images, through the same transform and batch size in every loop.

Run: ``DATASETS=../shared/data .venv/bin/python bench/callbacks_cost.py --write``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import timm
import torch
from torch import Tensor, nn

import ash_lightning.models  # noqa: F401  (registers cifar_resnet20)
from ash_lightning.callbacks import ActivationShapingCallback, OODMetricsCallback
from ash_lightning.data import OODDataModule
from ash_lightning.models.checkpoint import load_checkpoint
from ash_lightning.module import OODEvalModule

from _common import (
    ID_FILE,
    OOD_FILES,
    checkpoint_file,
    command_line,
    datasets_dir,
    machine_line,
    markdown_table,
    publish,
)

OOD_SETS = ("textures", "mnist")
TARGET_OVERHEAD, TARGET_RATIO = 0.03, 0.95


class UserClassifier(pl.LightningModule):
    """A user's module of the Hydra-template kind: test_step logs its own metrics and returns None."""

    def __init__(self, checkpoint: str) -> None:
        super().__init__()
        self.net = timm.create_model("cifar_resnet20")
        load_checkpoint(self.net, checkpoint)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _ = batch
        logits = self(x)
        self.log("test/loss", nn.functional.cross_entropy(logits, y))
        self.log("test/acc", (logits.argmax(1) == y).float().mean())


class Clock(pl.Callback):
    """Times of the test loop: ``start`` (first ID batch starts), ``id_end`` (last ID batch ended: after the other
    callbacks when this one is last) and ``epoch_end`` (the loop ended: before the other callbacks when first)."""

    def __init__(self) -> None:
        self.start = self.id_end = self.epoch_end = 0.0

    def on_test_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0:
            self.start = time.perf_counter()

    def on_test_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if dataloader_idx == 0:
            self.id_end = time.perf_counter()

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.epoch_end = time.perf_counter()


def _trainer(callbacks: list[Any], out: str) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        default_root_dir=out,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def _timed(hook: Callable[..., None], total: list[float]) -> Callable[..., None]:
    """``hook`` adding the seconds it runs to ``total[0]``."""

    def timed(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        hook(*args, **kwargs)
        total[0] += time.perf_counter() - start

    return timed


def _quietly(run: Callable[[], dict[str, float]]) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images per set (default 1000)")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds after the warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the docstring)")
    parser.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = checkpoint_file("cifar_resnet20")
    root = datasets_dir([ID_FILE, checkpoint, *(OOD_FILES[n] for n in OOD_SETS)])
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    id_spec = {"kind": "npz", "path": str(root / ID_FILE), "limit": args.images}
    ood_specs = {n: {"kind": "npz", "path": str(root / OOD_FILES[n]), "limit": args.images} for n in OOD_SETS}
    data = OODDataModule(
        id=id_spec, ood=ood_specs, backbone="cifar_resnet20", batch_size=args.batch_size, num_workers=0
    )
    id_loader = data.test_dataloader()[0]
    transform = id_loader.dataset.transform
    out = tempfile.mkdtemp()
    ood_images = args.images * len(OOD_SETS)

    def user_alone() -> dict[str, float]:
        clock = Clock()
        _trainer([clock], out).test(UserClassifier(str(root / checkpoint)), id_loader, verbose=False)
        return {"id": clock.id_end - clock.start}

    def user_with_callbacks() -> dict[str, float]:
        first, last = Clock(), Clock()
        metrics = OODMetricsCallback(
            ood=ood_specs, transform=transform, output_dir=out, log_figures=False, verbose=False
        )
        scoring = metrics._score_ood_sets
        spent: list[float] = []

        def timed(*a: Any) -> None:
            start = time.perf_counter()
            scoring(*a)
            spent.append(time.perf_counter() - start)

        metrics._score_ood_sets = timed  # type: ignore[method-assign]
        callbacks = [first, ActivationShapingCallback("ash_s@90"), metrics, last]
        _trainer(callbacks, out).test(UserClassifier(str(root / checkpoint)), id_loader, verbose=False)
        return {"id": last.id_end - last.start, "ood": spent[0]}

    def user_with_metrics_only() -> dict[str, float]:
        last = Clock()
        metrics = OODMetricsCallback(
            ood=ood_specs, transform=transform, output_dir=out, log_figures=False, verbose=False
        )
        in_hooks = [0.0]
        for hook in ("on_test_batch_start", "on_test_batch_end"):
            setattr(metrics, hook, _timed(getattr(metrics, hook), in_hooks))
        _trainer([metrics, last], out).test(UserClassifier(str(root / checkpoint)), id_loader, verbose=False)
        return {"id": last.id_end - last.start, "hooks": in_hooks[0]}

    def main_py() -> dict[str, float]:  # as main.py test builds it: a fresh data module and module
        data = OODDataModule(
            id=id_spec, ood=ood_specs, backbone="cifar_resnet20", batch_size=args.batch_size, num_workers=0
        )
        first, last = Clock(), Clock()
        module = OODEvalModule("cifar_resnet20", checkpoint_path=str(root / checkpoint), shaping="ash_s@90")
        metrics = OODMetricsCallback(output_dir=out, log_figures=False, verbose=False)
        _trainer([first, metrics, last], out).test(module, datamodule=data, verbose=False)
        return {"ood": first.epoch_end - last.id_end}

    loops = {
        "user loop alone": user_alone,
        "user loop + OODMetricsCallback": user_with_metrics_only,
        "user loop + both callbacks (ood=)": user_with_callbacks,
        "main.py test (OODEvalModule)": main_py,
    }
    times: dict[str, dict[str, list[float]]] = {name: {} for name in loops}
    for round_ in range(args.rounds + 1):
        for name, loop in loops.items():
            measured = _quietly(loop)
            if round_:
                for key, value in measured.items():
                    times[name].setdefault(key, []).append(value)
            print(f"round {round_} {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in measured.items()), flush=True)
    median = {name: {k: statistics.median(v) for k, v in parts.items()} for name, parts in times.items()}
    alone = median["user loop alone"]["id"]
    # ratios within each round (runs next to each other in time), then their median: drift between rounds cancels
    overhead = (
        statistics.median(
            a / b
            for a, b in zip(times["user loop + OODMetricsCallback"]["id"], times["user loop alone"]["id"], strict=True)
        )
        - 1
    )
    hooks = median["user loop + OODMetricsCallback"]["hooks"] / median["user loop + OODMetricsCallback"]["id"]
    both = times["user loop + both callbacks (ood=)"]
    overhead_both = (
        statistics.median(a / b for a, b in zip(both["id"], times["user loop alone"]["id"], strict=True)) - 1
    )
    ours_rate = ood_images / median["user loop + both callbacks (ood=)"]["ood"]
    main_rate = ood_images / median["main.py test (OODEvalModule)"]["ood"]
    speed = statistics.median(
        m / o for o, m in zip(both["ood"], times["main.py test (OODEvalModule)"]["ood"], strict=True)
    )
    rows = [
        ["ID loop: user alone", f"{alone:.2f} s", "", ""],
        [
            "ID loop: + OODMetricsCallback",
            f"{median['user loop + OODMetricsCallback']['id']:.2f} s",
            f"{overhead:+.1%}",
            f"≤ +{TARGET_OVERHEAD:.0%}",
        ],
        [
            "ID loop: time inside OODMetricsCallback's batch hooks",
            f"{median['user loop + OODMetricsCallback']['hooks']:.3f} s",
            f"{hooks:.2%} of the loop",
            f"≤ {TARGET_OVERHEAD:.0%}",
        ],
        [
            "ID loop: + ActivationShapingCallback(ash_s@90) + OODMetricsCallback",
            f"{median['user loop + both callbacks (ood=)']['id']:.2f} s",
            f"{overhead_both:+.1%}",
            "(includes ASH itself)",
        ],
        ["OOD sets: main.py test", f"{main_rate:.0f} img/s", "1.00x", ""],
        [
            "OOD sets: scored by OODMetricsCallback(ood=...)",
            f"{ours_rate:.0f} img/s",
            f"{speed:.2f}x",
            f"≥ {TARGET_RATIO}x",
        ],
    ]
    per_round = "; ".join(
        f"{name}: " + ", ".join(f"{k} " + "/".join(f"{v:.2f}" for v in values) for k, values in parts.items())
        for name, parts in times.items()
    )
    text = (
        "## Cost of the callbacks in a user's project (callbacks_cost)\n\n"
        f"Generated by `{command_line()}` on {machine_line()}.\n\n"
        f"cifar_resnet20, ID = {args.images} CIFAR-10 test images, OOD = {args.images} images each of "
        f"{', '.join(OOD_SETS)}; batch size {args.batch_size}, no data workers; medians of {args.rounds} "
        "interleaved rounds after a warm-up round (bench/callbacks_cost.py's docstring says what each time spans).\n\n"
        + markdown_table(["loop", "median", "ratio", "target"], rows, "lrrr")
        + f"\n\nEvery round's seconds: {per_round}.\n"
    )
    publish("callbacks_cost", text, args.write)


if __name__ == "__main__":
    main()
