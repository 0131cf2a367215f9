"""Benchmark: images per second of the ``main.py test`` loop against a plain PyTorch loop, and the shaping
hook's overhead.

*Ours* is what ``main.py test`` runs: ``OODEvalModule`` + ``OODDataModule`` + ``OODMetricsCallback`` through
``Trainer.test`` (TensorBoard logger, progress bar off), with one shaping setting and the energy score.
*Plain* is the loop of the original ASH ``ood_eval.py``: ``for x, y in loader: logits = model(x);
score = logsumexp(logits)``, collecting the scores on the CPU, under ``torch.inference_mode`` like the
Lightning test loop. Both use the same model object, the same data module (so the same DataLoader settings
and transform), batch size and shaping (the plain loop attaches it with ``attach_shaping``).

Steady state: a batch is timed from the end of the previous batch to the end of its own (data loading,
forward, score, the callback's bookkeeping), and the first batch of every dataloader is left out (worker
start-up, warm-up, and in Lightning the previous set's ``scores.npz`` write). Each repeat runs the three
loops (ours, plain + hook, plain) in a rotated order; throughput is 1 / the median seconds per image over
all steady-state batches of all repeats (also given: fastest batches, medians of whole passes). Hooks on
the first conv and the classifier split each batch into the forward pass and the rest, which isolates
Lightning's own per-batch cost from the forward's noise on a shared machine. The hook overhead is
measured three ways: from the loops, paired per batch (each batch is run with and without the hook back to
back, alternating which goes first), and as the time of the hook's own work (its shaping function) over
the plain batch time. End-to-end figures time the whole ``Trainer`` construction + ``Trainer.test`` call
(set-up, metrics, figures, files) against the whole plain loop.

Run: ``DATASETS=../shared/data .venv/bin/python bench/throughput.py`` (CPU: ``cifar_resnet56`` on CIFAR-10 /
Tiny-ImageNet subsets, batch 500; timm ``resnet50``, random weights, on 224 px noise, batch 32).
GPU variant: ``bench/throughput.py --settings resnet50 --device cuda --bf16 --channels-last`` (batch 256,
8 data workers, bf16 autocast in both loops, weights in channels_last; written to the ``throughput_cuda``
section).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn

from _common import (ID_FILE, OOD_FILES, checkpoint_file, command_line, datasets_dir, machine_line,
                     markdown_table, npz_spec, pct, publish)
from ash_lightning.data import OODDataModule
from ash_lightning.hooks import attach_shaping
from ash_lightning.module import OODEvalModule
from callbacks import OODMetricsCallback

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
        images, batch = args.images or 1500, args.batch_size or 500
        settings.append(Setting(
            "cifar", "cifar_resnet56", checkpoint_file("cifar_resnet56"),
            {"id": npz_spec(ID_FILE, name="cifar10", limit=images),
             "ood": {"tinyimagenet": npz_spec(OOD_FILES["tinyimagenet"], limit=images)}},
            batch, args.num_workers or 2,
            f"`cifar_resnet56` (akamaster weights); ID: {images} CIFAR-10 test images (JPEG q75), OOD: {images} "
            "Tiny-ImageNet images (seeded random subsets); 32×32"))
    if "resnet50" in args.settings:
        batch = args.batch_size or (256 if cuda else 32)
        images = args.images or (10 * batch if cuda else 2 * batch)
        settings.append(Setting(
            "resnet50", "resnet50", None,
            {"id": {"kind": "gaussian", "size": 224, "num_samples": images, "seed": 0},
             "ood": {"uniform": {"kind": "uniform", "size": 224, "num_samples": images, "seed": 1}}},
            batch, args.num_workers or (8 if cuda else 2),
            f"timm `resnet50`, random weights; ID: {images} Gaussian-noise images, OOD: {images} uniform-noise "
            "images, 224×224 after timm's eval transform"))
    for s in settings:
        if s.images_per_set < 2 * s.batch_size:
            raise SystemExit(f"error: {s.name}: {s.images_per_set} images per set give fewer than 2 batches of "
                             f"{s.batch_size}; steady state needs at least 2. Raise --images.")
    return settings


@dataclass(frozen=True)
class Runtime:
    """Device and precision shared by both loops."""

    device: torch.device
    bf16: bool

    def sync(self) -> None:
        """Wait for queued device work (a no-op on the CPU), so that timestamps are exact."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on the device when asked for, else a no-op context."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


class Clock:
    """End-of-batch timestamps, batch sizes and forward seconds per dataloader; a context manager.

    While active, hooks on the model's first conv (input side) and classifier (output side) time the
    forward pass of every batch, which splits each batch into the forward (with the shaping) and the rest:
    waiting for data, the loop or framework, the score and bookkeeping.
    """

    def __init__(self, model: nn.Module, runtime: Runtime) -> None:
        self.runtime = runtime
        self.stamps: dict[int, list[tuple[float, int, float]]] = {}
        self._modules = (model.get_submodule(model.pretrained_cfg["first_conv"]), model.get_classifier())
        self._forward = self._began = 0.0
        self._handles: list[Any] = []

    def __enter__(self) -> Clock:
        first, classifier = self._modules
        self._handles = [first.register_forward_pre_hook(self._begin), classifier.register_forward_hook(self._end)]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _begin(self, *_: Any) -> None:
        self.runtime.sync()
        self._began = time.perf_counter()

    def _end(self, *_: Any) -> None:
        self.runtime.sync()
        self._forward += time.perf_counter() - self._began

    def tick(self, loader: int, images: int) -> None:
        """Record the end of a batch of ``images`` images of dataloader ``loader``."""
        self.runtime.sync()
        self.stamps.setdefault(loader, []).append((time.perf_counter(), images, self._forward))
        self._forward = 0.0

    def _steady(self) -> list[tuple[float, int, float]]:
        """(seconds, images, forward seconds) of every batch after its dataloader's first."""
        return [(t1 - t0, n, f) for stamps in self.stamps.values() for (t0, _, _), (t1, n, f) in zip(stamps, stamps[1:])]

    def steady_rate(self) -> float:
        """Images per second over every dataloader's batches after its first."""
        batches = self._steady()
        return sum(n for _, n, _ in batches) / sum(d for d, _, _ in batches)

    def per_image(self) -> list[float]:
        """Seconds per image of every steady-state batch."""
        return [d / n for d, n, _ in self._steady()]

    def outside_forward(self) -> list[float]:
        """Seconds per image of every steady-state batch spent outside the forward pass."""
        return [(d - f) / n for d, n, f in self._steady()]

    def images(self) -> int:
        """All images ticked."""
        return sum(n for stamps in self.stamps.values() for _, n, _ in stamps)


class BatchClock(pl.Callback):
    """Ticks a ``Clock`` at the end of every test batch (placed after ``OODMetricsCallback``)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self.clock.tick(dataloader_idx, len(batch[0]))


@dataclass
class Timing:
    """One pass of one loop: steady-state and end-to-end images per second, and the seconds per image of
    each steady-state batch, in all and outside the forward pass."""

    steady: float
    end_to_end: float
    per_image: list[float]
    outside_forward: list[float]

    @classmethod
    def of(cls, clock: Clock, seconds: float) -> Timing:
        """The timing of a pass that ticked ``clock`` and took ``seconds`` end to end."""
        return cls(clock.steady_rate(), clock.images() / seconds, clock.per_image(), clock.outside_forward())


def lightning_pass(module: OODEvalModule, datamodule: OODDataModule, runtime: Runtime, log_dir: str) -> Timing:
    """One ``Trainer.test`` as ``main.py test`` runs it; its printed table is swallowed."""
    clock = Clock(module.model, runtime)
    start = time.perf_counter()
    trainer = pl.Trainer(accelerator="gpu" if runtime.device.type == "cuda" else "cpu", devices=1,
                         precision="bf16-mixed" if runtime.bf16 else "32-true",
                         logger=TensorBoardLogger(log_dir, name="lightning"),
                         callbacks=[OODMetricsCallback(), BatchClock(clock)],
                         enable_progress_bar=False, enable_model_summary=False)
    with contextlib.redirect_stdout(io.StringIO()), clock:
        trainer.test(module, datamodule=datamodule, verbose=False)
    return Timing.of(clock, time.perf_counter() - start)


def _energy(model: nn.Module, x: Tensor, runtime: Runtime) -> Tensor:
    """The plain loop's body: logits, then the energy score, on the CPU."""
    with runtime.autocast():
        logits = model(x.to(runtime.device, non_blocking=True))
    return torch.logsumexp(logits.float(), dim=1).cpu()


def plain_pass(model: nn.Module, datamodule: OODDataModule, runtime: Runtime, shaping: str | None) -> Timing:
    """The ASH ``ood_eval.py`` loop over every test dataloader, with ``shaping`` attached if given."""
    start = time.perf_counter()
    model.to(runtime.device)
    hook = attach_shaping(model, shaping) if shaping else contextlib.nullcontext()
    with hook, Clock(model, runtime) as clock, torch.inference_mode():
        for d, loader in enumerate(datamodule.test_dataloader()):
            scores = []
            for x, _, _ in loader:
                scores.append(_energy(model, x, runtime))
                clock.tick(d, len(x))
            np.concatenate([s.numpy() for s in scores])  # ood_eval.py gathers each set's scores like this
    return Timing.of(clock, time.perf_counter() - start)


@dataclass
class Paired:
    """Seconds of the plain loop body per batch, without and with the hook, measured pair by pair."""

    without: list[float] = field(default_factory=list)
    hooked: list[float] = field(default_factory=list)

    def ratios(self) -> np.ndarray:
        """Per pair: time with the hook / time without."""
        return np.array(self.hooked) / np.array(self.without)

    @property
    def overhead(self) -> float:
        """Median over the pairs of (with / without) - 1."""
        return float(np.median(self.ratios())) - 1

    @property
    def fastest_overhead(self) -> float:
        """Fastest batch with the hook / fastest batch without, minus 1 (others' load only adds time)."""
        return min(self.hooked) / min(self.without) - 1


def paired_hook_pass(model: nn.Module, datamodule: OODDataModule, runtime: Runtime, shaping: str, pairs: int
                     ) -> Paired:
    """``pairs`` back-to-back runs of the plain loop body on every batch, without and with the hook
    (alternating which goes first); the hook is attached and removed outside the timed region."""
    model.to(runtime.device)
    paired = Paired()
    with torch.inference_mode():
        for loader in datamodule.test_dataloader():
            for x, _, _ in loader:
                for _ in range(pairs):
                    for hooked in (False, True) if len(paired.without) % 2 else (True, False):
                        with attach_shaping(model, shaping) if hooked else contextlib.nullcontext():
                            runtime.sync()
                            start = time.perf_counter()
                            _energy(model, x, runtime)
                            runtime.sync()
                            (paired.hooked if hooked else paired.without).append(time.perf_counter() - start)
    return paired


def isolated_hook_cost(model: nn.Module, shaping: str, batch_size: int, runtime: Runtime, calls: int = 200
                       ) -> float:
    """Median seconds of the work the attached hook does per batch (its shaping function) on a batch of
    non-negative penultimate features (B, C): the hook's own cost, free of the noise of a full forward."""
    features = torch.rand(batch_size, model.num_features, device=runtime.device)
    seconds = []
    with torch.inference_mode(), attach_shaping(model, shaping) as handle:
        for _ in range(calls):
            runtime.sync()
            start = time.perf_counter()
            handle.shaping(features)
            runtime.sync()
            seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


@dataclass
class Result:
    """All timings of one setting."""

    setting: Setting
    runs: dict[str, list[Timing]]
    paired: Paired
    hook_seconds: float

    def fastest(self, loop: str) -> float:
        """Images per second of the fastest steady-state batch of ``loop`` (others' load only adds time)."""
        return 1 / min(s for t in self.runs[loop] for s in t.per_image)

    def outside(self, loop: str) -> float:
        """Median seconds per image of ``loop`` outside the forward pass, pooled over the repeats."""
        return float(np.median([s for t in self.runs[loop] for s in t.outside_forward]))

    def forward(self, loop: str) -> float:
        """Median seconds per image of ``loop`` in the forward pass, pooled over the repeats."""
        return float(np.median([a - b for t in self.runs[loop] for a, b in zip(t.per_image, t.outside_forward)]))

    def rate(self, loop: str) -> float:
        """Images per second of ``loop`` from the median seconds per image of its steady-state batches,
        pooled over the repeats (robust to other jobs' bursts on a shared machine)."""
        return 1 / float(np.median([s for t in self.runs[loop] for s in t.per_image]))

    def median(self, loop: str, what: str = "steady") -> float:
        """Median images per second of ``loop`` over the repeats (``what``: steady or end_to_end)."""
        return statistics.median(getattr(t, what) for t in self.runs[loop])

    def ratio(self, loop: str, base: str, what: str = "steady") -> float:
        """Median throughput of ``loop`` divided by that of ``base``."""
        return self.median(loop, what) / self.median(base, what)

    def ratio_range(self, loop: str, base: str) -> tuple[float, float]:
        """Smallest and largest steady-state ratio ``loop`` / ``base`` within one repeat."""
        ratios = [a.steady / b.steady for a, b in zip(self.runs[loop], self.runs[base])]
        return min(ratios), max(ratios)

    @property
    def loop_overhead(self) -> float:
        """Hook overhead from the loops' median batches: plain / plain-with-hook images per second, minus 1."""
        return self.rate("plain") / self.rate("plain + hook") - 1

    @property
    def framework_overhead(self) -> float:
        """Extra time per image outside the forward of ours over plain + hook, over the plain + hook time."""
        return (self.outside("ours") - self.outside("plain + hook")) * self.rate("plain + hook")

    @property
    def hook_fraction(self) -> float:
        """The isolated hook cost as a fraction of the median plain batch time."""
        return self.hook_seconds / float(np.median(self.paired.without))


def bench_setting(setting: Setting, args: argparse.Namespace, runtime: Runtime) -> Result:
    """Build the module and data once, warm up, then time the loops ``args.repeats`` times, rotated."""
    module = OODEvalModule(setting.backbone, shaping=args.shaping, score="energy",
                           checkpoint_path=setting.checkpoint and f"$DATASETS/{setting.checkpoint}")
    if args.channels_last:
        module.model.to(memory_format=torch.channels_last)
    datamodule = OODDataModule(**setting.data, backbone=setting.backbone, batch_size=setting.batch_size,
                               num_workers=setting.num_workers, pin_memory=runtime.device.type == "cuda")
    datamodule.setup("test")
    runs: dict[str, list[Timing]] = {loop: [] for loop in LOOPS}
    with tempfile.TemporaryDirectory() as log_dir:
        passes = {"ours": lambda: lightning_pass(module, datamodule, runtime, log_dir),
                  "plain + hook": lambda: plain_pass(module.model, datamodule, runtime, args.shaping),
                  "plain": lambda: plain_pass(module.model, datamodule, runtime, None)}
        model = module.model.to(runtime.device)
        x, _, _ = next(iter(datamodule.test_dataloader()[0]))
        with torch.inference_mode(), attach_shaping(model, args.shaping):
            _energy(model, x, runtime)  # warm-up: lazy initialisation, allocator, kernel choice
        for r in range(args.repeats):
            for loop in LOOPS[r % len(LOOPS):] + LOOPS[:r % len(LOOPS)]:
                runs[loop].append(passes[loop]())
                print(f"  [{setting.name}] repeat {r + 1}/{args.repeats} {loop:>12}: steady "
                      f"{runs[loop][-1].steady:8.1f} img/s, end-to-end {runs[loop][-1].end_to_end:8.1f} img/s",
                      flush=True)
    paired = paired_hook_pass(module.model, datamodule, runtime, args.shaping, args.pairs)
    print(f"  [{setting.name}] paired: {len(paired.without)} pairs, median {np.median(paired.without) * 1e3:.1f} ms "
          f"without, {np.median(paired.hooked) * 1e3:.1f} ms with the hook, overhead {pct(paired.overhead)}%",
          flush=True)
    hook_seconds = isolated_hook_cost(module.model, args.shaping, setting.batch_size, runtime)
    print(f"  [{setting.name}] hook alone: {hook_seconds * 1e6:.1f} µs per batch", flush=True)
    return Result(setting, runs, paired, hook_seconds)


def section_name(args: argparse.Namespace) -> str:
    """The BENCHMARKS.md section: ``throughput`` on the CPU, ``throughput_<device>`` otherwise."""
    return "throughput" if args.device == "cpu" else f"throughput_{args.device}"


def _verdict(value: str, ok: bool) -> str:
    return f"**{value}** {'✓' if ok else '✗'}"


def report(results: Sequence[Result], args: argparse.Namespace) -> str:
    """The Markdown section: set-up, loop throughput, where the time goes, hook overhead, verdicts."""
    shaping = f"`{args.shaping}`"
    loops = markdown_table(
        ["setting", "batch", "images / pass", "plain img/s", f"plain + {shaping} hook img/s",
         f"ours ({shaping}) img/s", f"ours ÷ plain + hook (≥ {TARGET_RATIO})", "ours ÷ plain",
         "fastest batches: ours ÷ plain + hook", "pass medians: ours ÷ plain + hook (range)",
         "end-to-end: ours ÷ plain + hook"],
        [[r.setting.name, r.setting.batch_size, 2 * r.setting.images_per_set, f"{r.rate('plain'):.1f}",
          f"{r.rate('plain + hook'):.1f}", f"{r.rate('ours'):.1f}",
          _verdict(f"{r.rate('ours') / r.rate('plain + hook'):.3f}",
                   r.rate("ours") / r.rate("plain + hook") >= TARGET_RATIO),
          f"{r.rate('ours') / r.rate('plain'):.3f}", f"{r.fastest('ours') / r.fastest('plain + hook'):.3f}",
          "{:.3f} ({:.3f}–{:.3f})".format(r.ratio("ours", "plain + hook"), *r.ratio_range("ours", "plain + hook")),
          f"{r.ratio('ours', 'plain + hook', 'end_to_end'):.3f}"] for r in results])
    where = markdown_table(
        ["setting", "forward + shaping, ms/batch", "outside the forward, ms/batch: plain + hook", "ours",
         "ours' extra ÷ plain + hook batch time", f"implied ours ÷ plain + hook (≥ {TARGET_RATIO})"],
        [[r.setting.name, f"{r.forward('plain + hook') * r.setting.batch_size * 1e3:.1f}",
          f"{r.outside('plain + hook') * r.setting.batch_size * 1e3:.1f}",
          f"{r.outside('ours') * r.setting.batch_size * 1e3:.1f}", f"{pct(r.framework_overhead)}%",
          _verdict(f"{1 / (1 + r.framework_overhead):.4f}", 1 / (1 + r.framework_overhead) >= TARGET_RATIO)]
         for r in results])
    hooks = markdown_table(
        ["setting", "loops: plain ÷ plain + hook − 1", "pairs", "paired, fastest: with ÷ without − 1",
         "paired, median of with ÷ without − 1 (quartiles)", "hook alone: µs/batch",
         f"hook alone ÷ plain batch time (≤ {pct(TARGET_OVERHEAD, 0)}%)"],
        [[r.setting.name, f"{pct(r.loop_overhead)}%", len(r.paired.without), f"{pct(r.paired.fastest_overhead)}%",
          f"{pct(r.paired.overhead)}% (" + " … ".join(f"{pct(q - 1)}%" for q in
                                                      np.quantile(r.paired.ratios(), (0.25, 0.75))) + ")",
          f"{r.hook_seconds * 1e6:.1f}", _verdict(f"{pct(r.hook_fraction, 3)}%", r.hook_fraction <= TARGET_OVERHEAD)]
         for r in results])
    return "\n".join([
        f"## Throughput: `main.py test` loop vs a plain PyTorch loop ({section_name(args)})",
        "",
        f"Generated by `{command_line()}` on {machine_line()}. Device {args.device}, "
        f"{'bf16 autocast' if args.bf16 else 'float32'}, "
        f"{'channels_last weights' if args.channels_last else 'contiguous weights'}; {args.repeats} repeats.",
        "",
        *[f"- **{r.setting.name}**: {r.setting.description}; batch {r.setting.batch_size}, "
          f"{r.setting.num_workers} data workers." for r in results],
        "",
        "*ours*: `OODEvalModule` + `OODDataModule` + `OODMetricsCallback` through `Trainer.test`, as `main.py test` "
        f"runs it, shaping {shaping}, score energy. *plain*: `for x, y in loader: logits = model(x); "
        "score = logsumexp(logits)` on the same model, data module, batch size, under `inference_mode`; *plain + "
        f"hook* is the same loop with `attach_shaping(model, {args.shaping!r})`. Each repeat runs the three loops "
        "in a rotated order. Steady state leaves out every dataloader's first batch. The img/s columns are "
        "1 / the median seconds per image over all steady-state batches of all repeats, which resists the bursts "
        "of other jobs on a shared machine; *fastest batches* compares the fastest batch of each loop; *pass medians* divides the median whole-pass steady-state rates "
        "instead (range: the ratio within each repeat). *End-to-end* times the whole `Trainer` construction + "
        "`Trainer.test` (set-up, worker start-up, metrics, figures, files) against the whole plain loop.",
        "",
        loops,
        "",
        "Where a steady-state batch's time goes (medians over all batches of all repeats). Hooks on the first conv "
        "and the classifier time the forward pass; the rest is waiting for data, the loop or framework, the score "
        "and bookkeeping. *Ours' extra* is (ours − plain + hook) outside the forward, over the median plain + hook "
        "batch time: Lightning's own per-batch cost, measured without the forward, whose run-to-run noise on a "
        "shared machine is larger than the effect; *implied* is 1 / (1 + extra).",
        "",
        where,
        "",
        "Hook overhead: the plain loop with vs without the hook. *Loops*: from the img/s above. *Paired*: every "
        f"batch is run {args.pairs}× both ways back to back (alternating which goes first); *fastest* compares the "
        "fastest batch of each kind, *median* is the median over the pairs, with its quartiles. Both are loop "
        "measurements whose noise here is a few percent either way. *Hook alone*: the median time of the work the "
        "hook adds per batch (its shaping function, 200 calls) on a batch of random non-negative penultimate "
        "features, over the median plain batch time: the resolution needed to check a 2% target.",
        "",
        hooks,
    ])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", choices=("cifar", "resnet50"), default=["cifar", "resnet50"])
    parser.add_argument("--shaping", default="ash_s@90", help="the single shaping setting of both loops")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=3, help="with/without-hook pairs per batch (paired overhead)")
    parser.add_argument("--images", type=int, help="images per set (ID and OOD each); default per setting")
    parser.add_argument("--batch-size", type=int, help="default: 500 (cifar), 32 (resnet50 on CPU), 256 (GPU)")
    parser.add_argument("--num-workers", type=int, help="default: 2 (CPU), 8 (resnet50 on GPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in both loops (Lightning bf16-mixed)")
    parser.add_argument("--channels-last", action="store_true", help="convert the weights to channels_last")
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
    runtime = Runtime(torch.device(args.device), args.bf16)
    results = [bench_setting(setting, args, runtime) for setting in make_settings(args)]
    publish(section_name(args), report(results, args), write=not args.no_write)


if __name__ == "__main__":
    main()
