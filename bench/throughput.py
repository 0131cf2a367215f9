"""Benchmark: images per second of the ``main.py test`` loop (*ours*) against the plain PyTorch loop of ASH's
``ood_eval.py`` with and without the shaping hook, and the hook's own cost. BENCHMARKS.md ("How the throughput
section is measured") describes the loops, the interleaving and the figures; ``--help`` lists the options.

Run: ``DATASETS=../shared/data .venv/bin/python bench/throughput.py``; on a GPU:
``bench/throughput.py --settings resnet50 --device cuda --bf16 --channels-last``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import resource
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn

from ash_lightning.callbacks import OODMetricsCallback
from ash_lightning.cli.allocator import keep_freed_memory
from ash_lightning.data import OODDataModule
from ash_lightning.module import OODEvalModule
from ash_lightning.shaping.hooks import attach_shaping

from _common import (
    ID_FILE,
    OOD_FILES,
    checkpoint_file,
    command_line,
    datasets_dir,
    machine_line,
    markdown_table,
    npz_spec,
    pct,
    publish,
)

LOOPS = ("ours", "plain + hook", "plain")
TARGET_RATIO = 0.95
TARGET_OVERHEAD = 0.02


@dataclass(frozen=True)
class Setting:
    """One benchmark configuration: a backbone and its ID/OOD data, batch size and data workers."""

    name: str
    backbone: str
    checkpoint: str | None
    data: dict[str, Any]
    batch_size: int
    num_workers: int
    description: str

    @property
    def images_per_set(self) -> int:
        """Images in each of the ID and OOD sets."""
        return int(self.data["id"].get("limit") or self.data["id"]["num_samples"])


def make_settings(args: argparse.Namespace) -> list[Setting]:
    """The requested settings, with the CPU or GPU defaults unless overridden on the command line."""
    cuda = args.device == "cuda"
    settings = []
    if "cifar" in args.settings:
        images, batch = args.images or 1500, args.batch_size or 250
        settings.append(
            Setting(
                "cifar",
                "cifar_resnet56",
                checkpoint_file("cifar_resnet56"),
                {
                    "id": npz_spec(ID_FILE, name="cifar10", limit=images),
                    "ood": {"tinyimagenet": npz_spec(OOD_FILES["tinyimagenet"], limit=images)},
                },
                batch,
                args.num_workers or 2,
                f"`cifar_resnet56` (akamaster weights); ID: {images} CIFAR-10 test images (JPEG q75), OOD: {images} "
                "Tiny-ImageNet images (seeded random subsets); 32×32",
            )
        )
    if "resnet50" in args.settings:
        batch = args.batch_size or (256 if cuda else 16)
        images = args.images or (10 * batch if cuda else 5 * batch)
        settings.append(
            Setting(
                "resnet50",
                "resnet50",
                None,
                {
                    "id": {"kind": "gaussian", "size": 224, "num_samples": images, "seed": 0},
                    "ood": {"uniform": {"kind": "uniform", "size": 224, "num_samples": images, "seed": 1}},
                },
                batch,
                args.num_workers or (8 if cuda else 2),
                f"timm `resnet50`, random weights; ID: {images} Gaussian-noise images, OOD: {images} uniform-noise "
                "images, 224×224 after timm's eval transform",
            )
        )
    for s in settings:
        if s.images_per_set < 3 * s.batch_size:
            raise SystemExit(
                f"error: {s.name}: {s.images_per_set} images per set give fewer than 3 batches of "
                f"{s.batch_size}; steady state leaves out the first and last. Raise --images."
            )
    return settings


@dataclass(frozen=True)
class Runtime:
    """Device and precision shared by all loops."""

    device: torch.device
    bf16: bool

    def sync(self) -> None:
        """Wait for queued device work (a no-op on the CPU), so that timestamps are exact."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        """``time.perf_counter()`` after the device's queued work is done."""
        self.sync()
        return time.perf_counter()

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on the device when asked for, else a no-op context."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


class ForwardClock:
    """While active, hooks on the first conv and the classifier add up the seconds of every forward pass, from the
    first conv to the last classifier call (shaping included); ``take()`` returns them since its previous call."""

    def __init__(self, model: nn.Module, runtime: Runtime) -> None:
        self.runtime = runtime
        self._modules = (model.get_submodule(model.pretrained_cfg["first_conv"]), model.get_classifier())
        self._seconds = self._began = 0.0
        self._handles: list[Any] = []

    def __enter__(self) -> ForwardClock:
        first, classifier = self._modules
        self._handles = [first.register_forward_pre_hook(self._begin), classifier.register_forward_hook(self._end)]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _begin(self, *_: Any) -> None:
        self._began = self.runtime.now()

    def _end(self, *_: Any) -> None:
        """Adds the time since the first conv or the previous classifier call: a sweep calls the classifier once
        per setting after one backbone pass."""
        now = self.runtime.now()
        self._seconds += now - self._began
        self._began = now

    def take(self) -> float:
        """Forward seconds accumulated since the previous call."""
        seconds, self._seconds = self._seconds, 0.0
        return seconds


@dataclass
class Batches:
    """Steady-state batches of one loop: seconds per image in all and outside the forward pass."""

    per_image: list[float] = field(default_factory=list)
    outside_forward: list[float] = field(default_factory=list)

    def add(self, seconds: float, forward: float, images: int) -> None:
        """Record one batch of ``images`` images that took ``seconds``, ``forward`` of them in the forward."""
        self.per_image.append(seconds / images)
        self.outside_forward.append((seconds - forward) / images)

    def extend(self, other: Batches) -> None:
        self.per_image += other.per_image
        self.outside_forward += other.outside_forward

    @property
    def rate(self) -> float:
        """Images per second: 1 / the median seconds per image (robust to bursts of other jobs)."""
        return 1 / float(np.median(self.per_image))


class Stopwatch:
    """Batches of one separate pass, from end-of-batch timestamps per dataloader."""

    def __init__(self, forward: ForwardClock) -> None:
        self.forward = forward
        self.images = 0
        self._last: dict[int, float] = {}
        self._timed: dict[int, list[tuple[float, float, int]]] = {}

    def tick(self, loader: int, images: int) -> None:
        """The end of a batch of ``images`` images of dataloader ``loader``."""
        now, forward = self.forward.runtime.now(), self.forward.take()
        if loader in self._last:
            self._timed.setdefault(loader, []).append((now - self._last[loader], forward, images))
        self._last[loader] = now
        self.images += images

    @property
    def batches(self) -> Batches:
        """The steady-state batches: all but every dataloader's first and last."""
        batches = Batches()
        for timed in self._timed.values():
            for seconds, forward, images in timed[:-1]:
                batches.add(seconds, forward, images)
        return batches


class BatchTicker(pl.Callback):
    """Ticks a ``Stopwatch`` at the end of every test batch (placed after ``OODMetricsCallback``)."""

    def __init__(self, stopwatch: Stopwatch) -> None:
        self.stopwatch = stopwatch

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.stopwatch.tick(dataloader_idx, len(batch[0]))


@dataclass
class Pass:
    """One separate pass of one loop: its steady-state batches and end-to-end images per second."""

    batches: Batches
    end_to_end: float


def _trainer(runtime: Runtime, log_dir: str, callbacks: list[pl.Callback]) -> pl.Trainer:
    """``main.py test``'s ``Trainer`` (TensorBoard, no progress bar): ``OODMetricsCallback``, then ``callbacks``."""
    return pl.Trainer(
        accelerator="gpu" if runtime.device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if runtime.bf16 else "32-true",
        logger=TensorBoardLogger(log_dir, name="lightning"),
        callbacks=[OODMetricsCallback(), *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def lightning_pass(module: OODEvalModule, datamodule: OODDataModule, runtime: Runtime, log_dir: str) -> Pass:
    """One ``Trainer.test`` as ``main.py test`` runs it; its printed table is swallowed."""
    start = time.perf_counter()
    with ForwardClock(module.model, runtime) as forward:
        stopwatch = Stopwatch(forward)
        trainer = _trainer(runtime, log_dir, [BatchTicker(stopwatch)])
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.test(module, datamodule=datamodule, verbose=False)
    return Pass(stopwatch.batches, stopwatch.images / (time.perf_counter() - start))


def _energy(model: nn.Module, x: Tensor, runtime: Runtime) -> Tensor:
    """The plain loop's body after loading: logits, then the energy score, on the CPU."""
    with runtime.autocast():
        logits = model(x.to(runtime.device, non_blocking=True))
    return torch.logsumexp(logits.float(), dim=1).cpu()


def _hooked(model: nn.Module, shaping: str | None) -> contextlib.AbstractContextManager:
    """``attach_shaping(model, shaping)``, or a no-op context for ``None``."""
    return attach_shaping(model, shaping) if shaping else contextlib.nullcontext()


def plain_pass(model: nn.Module, datamodule: OODDataModule, runtime: Runtime, shaping: str | None) -> Pass:
    """The ASH ``ood_eval.py`` loop over every test dataloader, with ``shaping`` attached if given."""
    start = time.perf_counter()
    model.to(runtime.device)
    with _hooked(model, shaping), ForwardClock(model, runtime) as forward, torch.inference_mode():
        stopwatch = Stopwatch(forward)
        for d, loader in enumerate(datamodule.test_dataloader()):
            scores = []
            for x, _, _ in loader:
                scores.append(_energy(model, x, runtime))
                stopwatch.tick(d, len(x))
            np.concatenate([s.numpy() for s in scores])  # ood_eval.py gathers each set's scores like this
    return Pass(stopwatch.batches, stopwatch.images / (time.perf_counter() - start))


class InterleavedPlainLoops(pl.Callback):
    """After each Lightning test batch, one batch of *plain + hook* and one of *plain* (alternating which goes
    first), each from its own iterator over the same dataloader; every dataloader's first and last slots are
    left out. A Lightning batch runs from the end of the previous slot's plain work to its own batch end."""

    def __init__(
        self, model: nn.Module, datamodule: OODDataModule, runtime: Runtime, shaping: str, forward: ForwardClock
    ) -> None:
        self.model, self.datamodule, self.runtime, self.shaping, self.forward = (
            model,
            datamodule,
            runtime,
            shaping,
            forward,
        )
        self.batches = {loop: Batches() for loop in LOOPS}
        self._iterators: dict[str, Iterator] = {}
        self._resumed = 0.0

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        now, forward = self.runtime.now(), self.forward.take()
        last = batch_idx + 1 == trainer.num_test_batches[dataloader_idx]
        steady = batch_idx > 0 and not last
        if steady:
            self.batches["ours"].add(now - self._resumed, forward, len(batch[0]))
        if batch_idx == 0:
            loader = self.datamodule.test_dataloader()[dataloader_idx]
            self._iterators = {loop: iter(loader) for loop in LOOPS[1:]}
        plain = LOOPS[1:] if len(self.batches["plain"].per_image) % 2 == 0 else LOOPS[:0:-1]
        with torch.inference_mode():
            for loop in plain:
                with _hooked(self.model, self.shaping if loop == "plain + hook" else None):
                    start = self.runtime.now()
                    x, _, _ = next(self._iterators[loop])
                    _energy(self.model, x, self.runtime)
                    seconds, forward = self.runtime.now() - start, self.forward.take()
                if steady:
                    self.batches[loop].add(seconds, forward, len(x))
        if last:
            self._iterators = {}  # stops the plain loops' workers
        self._resumed = self.runtime.now()


def interleaved_pass(
    module: OODEvalModule, datamodule: OODDataModule, runtime: Runtime, shaping: str, log_dir: str
) -> dict[str, Batches]:
    """One ``Trainer.test`` with the plain loops interleaved batch by batch; steady-state batches per loop."""
    with ForwardClock(module.model, runtime) as forward:
        interleaved = InterleavedPlainLoops(module.model, datamodule, runtime, shaping, forward)
        with contextlib.redirect_stdout(io.StringIO()):
            _trainer(runtime, log_dir, [interleaved]).test(module, datamodule=datamodule, verbose=False)
    return interleaved.batches


def isolated_hook_cost(model: nn.Module, shaping: str, batch_size: int, runtime: Runtime, calls: int = 200) -> float:
    """Median seconds of the hook's own work (its shaping function) on a batch of random penultimate features."""
    features = torch.rand(batch_size, model.num_features, device=runtime.device)
    seconds = []
    with torch.inference_mode(), attach_shaping(model, shaping) as handle:
        for _ in range(calls):
            start = runtime.now()
            handle.shaping(features)
            seconds.append(runtime.now() - start)
    return float(np.median(seconds))


def _quartiles(values: np.ndarray) -> tuple[float, float]:
    return tuple(np.quantile(values, (0.25, 0.75)))


@dataclass
class Result:
    """All timings of one setting: interleaved slots, separate passes and the isolated hook cost."""

    setting: Setting
    interleaved: dict[str, Batches]
    passes: dict[str, list[Pass]]
    hook_seconds: float
    faults_per_batch: float

    def slot_ratios(self, loop: str, base: str) -> np.ndarray:
        """Per interleaved slot: throughput of ``loop`` / that of ``base`` (= base seconds / loop seconds)."""
        return np.array(self.interleaved[base].per_image) / np.array(self.interleaved[loop].per_image)

    def slot_ratio(self, loop: str, base: str) -> float:
        """Median over the interleaved slots of the throughput ratio ``loop`` / ``base``."""
        return float(np.median(self.slot_ratios(loop, base)))

    def pass_ratios(self, loop: str, base: str, end_to_end: bool = False) -> np.ndarray:
        """Per repeat of the separate passes: throughput of ``loop`` / that of ``base``."""

        def rate(p: Pass) -> float:
            return p.end_to_end if end_to_end else p.batches.rate

        return np.array([rate(a) / rate(b) for a, b in zip(self.passes[loop], self.passes[base], strict=True)])

    def pooled(self, loop: str) -> Batches:
        """All steady-state batches of the separate passes of ``loop``."""
        pooled = Batches()
        for p in self.passes[loop]:
            pooled.extend(p.batches)
        return pooled

    def batch_spread(self) -> float:
        """Coefficient of variation of the plain loop's seconds per image over the interleaved slots."""
        values = np.array(self.interleaved["plain"].per_image)
        return float(values.std() / values.mean())

    def seconds_per_batch(self, loop: str, outside: bool) -> float:
        """Median seconds per batch of ``loop`` in the interleaved slots, outside the forward or inside it."""
        b = self.interleaved[loop]
        values = b.outside_forward if outside else [a - o for a, o in zip(b.per_image, b.outside_forward, strict=True)]
        return float(np.median(values)) * self.setting.batch_size

    @property
    def framework_overhead(self) -> float:
        """Ours' extra time outside the forward over plain + hook's, as a fraction of plain + hook's batch."""
        extra = self.seconds_per_batch("ours", True) - self.seconds_per_batch("plain + hook", True)
        return extra * self.interleaved["plain + hook"].rate / self.setting.batch_size

    @property
    def hook_fraction(self) -> float:
        """The isolated hook cost as a fraction of the median plain batch time."""
        return self.hook_seconds * self.interleaved["plain"].rate / self.setting.batch_size


def bench_setting(setting: Setting, args: argparse.Namespace, runtime: Runtime) -> Result:
    """Build the module and data once, warm up, then run the interleaved passes and the separate passes."""
    module = OODEvalModule(
        setting.backbone,
        shaping=args.shaping,
        score="energy",
        checkpoint_path=setting.checkpoint and f"$DATASETS/{setting.checkpoint}",
    )
    if args.channels_last:
        module.model.to(memory_format=torch.channels_last)
    datamodule = OODDataModule(
        **setting.data,
        backbone=setting.backbone,
        batch_size=setting.batch_size,
        num_workers=setting.num_workers,
        pin_memory=runtime.device.type == "cuda",
    )
    datamodule.setup("test")
    model = module.model.to(runtime.device)
    x, _, _ = next(iter(datamodule.test_dataloader()[0]))
    with torch.inference_mode(), attach_shaping(model, args.shaping):
        _energy(model, x, runtime)  # warm-up: lazy initialisation, allocator, kernel choice
    interleaved = {loop: Batches() for loop in LOOPS}
    passes: dict[str, list[Pass]] = {loop: [] for loop in LOOPS}
    run = {
        "ours": lambda: lightning_pass(module, datamodule, runtime, log_dir),
        "plain + hook": lambda: plain_pass(model, datamodule, runtime, args.shaping),
        "plain": lambda: plain_pass(model, datamodule, runtime, None),
    }
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with tempfile.TemporaryDirectory() as log_dir:
        for r in range(args.interleaved):
            for loop, batches in interleaved_pass(module, datamodule, runtime, args.shaping, log_dir).items():
                interleaved[loop].extend(batches)
            print(
                f"  [{setting.name}] interleaved {r + 1}/{args.interleaved}: "
                + ", ".join(f"{loop} {b.rate:.1f} img/s" for loop, b in interleaved.items()),
                flush=True,
            )
        batches_run = args.interleaved * len(LOOPS) * 2 * -(-setting.images_per_set // setting.batch_size)
        faults_per_batch = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / batches_run
        for r in range(args.repeats):
            for loop in LOOPS if r % 2 == 0 else LOOPS[::-1]:
                passes[loop].append(run[loop]())
                print(
                    f"  [{setting.name}] pass {r + 1}/{args.repeats} {loop:>12}: steady "
                    f"{passes[loop][-1].batches.rate:8.1f} img/s, end-to-end {passes[loop][-1].end_to_end:8.1f} "
                    "img/s",
                    flush=True,
                )
    hook_seconds = isolated_hook_cost(model, args.shaping, setting.batch_size, runtime)
    print(f"  [{setting.name}] hook alone: {hook_seconds * 1e6:.1f} µs per batch", flush=True)
    return Result(setting, interleaved, passes, hook_seconds, faults_per_batch)


def section_name(args: argparse.Namespace) -> str:
    """The BENCHMARKS.md section: ``throughput`` on the CPU, ``throughput_<device>`` otherwise."""
    return "throughput" if args.device == "cpu" else f"throughput_{args.device}"


def _verdict(value: str, ok: bool) -> str:
    return f"**{value}** {'✓' if ok else '✗'}"


def _ratio_cell(values: np.ndarray, target: float | None = None) -> str:
    """Median of ``values`` with its quartiles, with a verdict against ``target`` when given."""
    median = f"{np.median(values):.3f}"
    cell = _verdict(median, float(np.median(values)) >= target) if target else median
    return cell + " ({:.3f}–{:.3f})".format(*_quartiles(values))


def report(results: Sequence[Result], args: argparse.Namespace) -> str:
    """The Markdown section: set-up, interleaved and separate-pass throughput, where the time goes, hook cost."""
    shaping = f"`{args.shaping}`"
    interleaved = markdown_table(
        [
            "setting",
            "batch",
            "slots",
            "plain img/s",
            f"plain + {shaping} hook img/s",
            f"ours ({shaping}) img/s",
            f"ours ÷ plain + hook (≥ {TARGET_RATIO})",
            "ours ÷ plain",
            "plain ÷ plain + hook",
        ],
        [
            [
                r.setting.name,
                r.setting.batch_size,
                len(r.interleaved["ours"].per_image),
                *(f"{r.interleaved[loop].rate:.1f}" for loop in ("plain", "plain + hook", "ours")),
                _ratio_cell(r.slot_ratios("ours", "plain + hook"), TARGET_RATIO),
                _ratio_cell(r.slot_ratios("ours", "plain")),
                _ratio_cell(r.slot_ratios("plain", "plain + hook")),
            ]
            for r in results
        ],
    )
    separate = markdown_table(
        [
            "setting",
            "images / pass",
            "plain img/s",
            "plain + hook img/s",
            "ours img/s",
            "ours ÷ plain + hook, per repeat",
            "pooled batches: ours ÷ plain + hook",
            "end-to-end: ours ÷ plain + hook",
        ],
        [
            [
                r.setting.name,
                2 * r.setting.images_per_set,
                *(f"{r.pooled(loop).rate:.1f}" for loop in ("plain", "plain + hook", "ours")),
                _ratio_cell(r.pass_ratios("ours", "plain + hook")),
                f"{r.pooled('ours').rate / r.pooled('plain + hook').rate:.3f}",
                _ratio_cell(r.pass_ratios("ours", "plain + hook", end_to_end=True)),
            ]
            for r in results
        ],
    )
    where = markdown_table(
        [
            "setting",
            "forward + shaping, ms/batch: plain + hook",
            "ours",
            "outside the forward, ms/batch: plain + hook",
            "ours",
            "ours' extra ÷ plain + hook batch time",
            f"implied ours ÷ plain + hook (≥ {TARGET_RATIO})",
        ],
        [
            [
                r.setting.name,
                *(
                    f"{r.seconds_per_batch(loop, outside) * 1e3:.1f}"
                    for outside in (False, True)
                    for loop in ("plain + hook", "ours")
                ),
                f"{pct(r.framework_overhead)}%",
                _verdict(f"{1 / (1 + r.framework_overhead):.4f}", 1 / (1 + r.framework_overhead) >= TARGET_RATIO),
            ]
            for r in results
        ],
    )
    hooks = markdown_table(
        [
            "setting",
            "hook alone: µs/batch",
            f"hook alone ÷ plain batch time (≤ {pct(TARGET_OVERHEAD, 0)}%)",
            "loops, interleaved: plain ÷ plain + hook − 1 (quartiles)",
        ],
        [
            [
                r.setting.name,
                f"{r.hook_seconds * 1e6:.1f}",
                _verdict(f"{pct(r.hook_fraction, 3)}%", r.hook_fraction <= TARGET_OVERHEAD),
                f"{pct(r.slot_ratio('plain', 'plain + hook') - 1)}% ("
                + " … ".join(f"{pct(q - 1)}%" for q in _quartiles(r.slot_ratios("plain", "plain + hook")))
                + ")",
            ]
            for r in results
        ],
    )
    spread = ", ".join(f"{pct(r.batch_spread(), 1)}% ({r.setting.name})" for r in results)
    return "\n".join(
        [
            f"## Throughput: `main.py test` loop vs a plain PyTorch loop ({section_name(args)})",
            "",
            f"Generated by `{command_line()}` on {machine_line()}. Device {args.device}, "
            f"{'bf16 autocast' if args.bf16 else 'float32'}, "
            f"{'channels_last weights' if args.channels_last else 'contiguous weights'}; "
            f"{args.interleaved} interleaved passes, {args.repeats} separate passes per loop. Memory: "
            + (
                "glibc malloc told to keep freed memory (`keep_freed_memory`), for all loops alike; "
                if args.keep_freed_memory
                else "glibc malloc defaults (`--default-malloc`); "
            )
            + "minor page faults per batch during the interleaved passes: "
            + ", ".join(f"{r.faults_per_batch:,.0f} ({r.setting.name})" for r in results)
            + f". Batch-to-batch spread of identical work (coefficient of variation of the plain loop): {spread}. "
            'The loops and figures are described above, in "How the throughput section is measured".',
            "",
            *[
                f"- **{r.setting.name}**: {r.setting.description}; batch {r.setting.batch_size}, "
                f"{r.setting.num_workers} data workers."
                for r in results
            ],
            "",
            f"Interleaved passes, shaping {shaping}, score energy: median of the per-slot ratios (quartiles).",
            "",
            interleaved,
            "",
            "Separate whole passes of each loop (order reversed every other repeat).",
            "",
            separate,
            "",
            "Where a batch's time goes (medians over the interleaved slots).",
            "",
            where,
            "",
            "Hook overhead: the hook's own work alone, and the loops' ratio over the interleaved slots.",
            "",
            hooks,
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", choices=("cifar", "resnet50"), default=["cifar", "resnet50"])
    parser.add_argument("--shaping", default="ash_s@90", help="the single shaping setting of both loops")
    parser.add_argument("--interleaved", type=int, default=8, help="interleaved passes (the headline ratios)")
    parser.add_argument("--repeats", type=int, default=4, help="separate passes of each loop")
    parser.add_argument("--images", type=int, help="images per set (ID and OOD each); default per setting")
    parser.add_argument("--batch-size", type=int, help="default: 250 (cifar), 16 (resnet50 on CPU), 256 (GPU)")
    parser.add_argument("--num-workers", type=int, help="default: 2 (CPU), 8 (resnet50 on GPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in both loops (Lightning bf16-mixed)")
    parser.add_argument("--channels-last", action="store_true", help="convert the weights to channels_last")
    parser.add_argument(
        "--default-malloc",
        dest="keep_freed_memory",
        action="store_false",
        help="leave glibc's malloc at its defaults (trims and re-maps freed memory)",
    )
    parser.add_argument("--no-write", action="store_true", help="print the section without writing BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if "cifar" in args.settings:
        datasets_dir([ID_FILE, OOD_FILES["tinyimagenet"], checkpoint_file("cifar_resnet56")])
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    if args.keep_freed_memory and not keep_freed_memory():
        raise SystemExit("error: glibc's mallopt is not available here; run with --default-malloc")
    runtime = Runtime(torch.device(args.device), args.bf16)
    results = [bench_setting(setting, args, runtime) for setting in make_settings(args)]
    publish(section_name(args), report(results, args), write=not args.no_write)


if __name__ == "__main__":
    main()
