"""Benchmark: OOD detection on the real CIFAR-10 data with the akamaster CIFAR ResNets, through ``main.py test``.

For each model, one sweep (one backbone pass per batch): every ``--shapings`` spec times every ``--scores``
name, plus ``react@<t>`` with a fixed threshold ``t`` = the ``--react-percentile`` percentile of the
penultimate activations on the 200 lossless CIFAR-10 *training* PNGs. The script writes a config
(``runs/bench/<section>/<model>.yaml``), runs ``python main.py test --config`` on it, reads the
``ood_results.json`` in the logger's log directory and prints (and writes to BENCHMARKS.md, between the
``<!-- BEGIN <section> -->`` markers) per-set and mean FPR95 / AUROC / AUPR-In, ID accuracy and wall time.

Reported rows: the first score for every shaping, and the other scores only for shaping ``none``
(i.e. energy for the shaped rows, plus the MSP baseline).

Run: ``DATASETS=../shared/data .venv/bin/python bench/cifar10_ood.py``.
Calibrated methods go to their own section, e.g.
``bench/cifar10_ood.py --section cifar10_ood_calibrated --shapings none react@p90 dice@90 --react-percentile 0
--fit-every 10`` (fit on every 10th ID image, test on the rest; ``--fit NPZ`` sets ``data.fit`` to another file).

``--detectors knn@50 vim@32 odin ...`` (needs fit data) adds a second ``main.py test`` run per model, shaping
``none`` times the detectors, whose rows join the table.

After the runs the script measures, in the same process, the extra cost per batch of ``--batch-size`` ID images of
every reported row relative to the backbone's forward pass (median of ``--cost-rounds`` interleaved rounds):
a shaping row costs what its setting adds to a sweep's batch (``outputs_from_shared`` from the part of the pass a
sweep shares, then the first score: the shaping and the classifier on the batch's penultimate features, for ``none``
the classifier alone; for ``rankfeat`` the last stage's two branches from its input, then pooling), calibrated
shapings fitted with ``calibrate_shapers`` on the fit data; a detector row costs its score (feature-space
detectors score the batch's features and logits, ``odin``/``adascale`` run their own passes), fitted with
``fit_detector`` on the same fit data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ash_lightning.data import OODDataModule
from ash_lightning.data.fit_pass import FitPass
from ash_lightning.detectors import FeatureDetector, FeaturesAndLogits
from ash_lightning.detectors.fitting import fit_detector
from ash_lightning.detectors.scoring import detector_scores
from ash_lightning.evaluation.metrics import fpr_key
from ash_lightning.models.backbone import create_backbone
from ash_lightning.scores import get_score
from ash_lightning.shaping.calibration import calibrate_shapers
from ash_lightning.shaping.hooks import resolve_hook_point
from ash_lightning.shaping.specs import get_shaping
from ash_lightning.shaping.sweep import outputs_from_shared, shared_part

from _common import (
    GROUPS,
    ID_FILE,
    OOD_FILES,
    REPO,
    TRAIN_FILE,
    checkpoint_file,
    command_line,
    datasets_dir,
    interleaved_medians,
    machine_line,
    markdown_table,
    npz_spec,
    pct,
    publish,
)

DEFAULT_SHAPINGS = [
    "none",
    "ash_p@65",
    "ash_p@80",
    "ash_p@90",
    "ash_b@65",
    "ash_b@80",
    "ash_b@90",
    "ash_s@65",
    "ash_s@80",
    "ash_s@90",
    "scale@85",
]
PUBLISHED_ACCURACY = {
    "cifar_resnet20": 0.9173,
    "cifar_resnet32": 0.9263,
    "cifar_resnet44": 0.9310,
    "cifar_resnet56": 0.9339,
}  # akamaster README, lossless CIFAR-10 test set
# The 1-minute load average, sampled when the script starts and before and after each step: the machine may be shared.
LOADS: list[float] = []
OOD_DESCRIPTIONS = {
    "textures": "DTD (Textures), 1,200 images of 10 of its 47 classes, resized to 32 on the short side "
    "(bilinear) and centre-cropped to 32×32",
    "mnist": "MNIST test set, 10,000 digits resized 28→32 (bilinear) and copied to 3 channels",
    "fashionmnist": "Fashion-MNIST test set, 10,000 images, processed like MNIST",
    "tinyimagenet": "Tiny-ImageNet test split, 10,000 images downscaled 64→32 and stored as JPEG q75 "
    '(ODIN\'s "TinyImageNet (resize)")',
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet56"])
    parser.add_argument(
        "--shapings",
        nargs="+",
        default=DEFAULT_SHAPINGS,
        help="shaping specs of the sweep (react@<t> from --react-percentile is appended)",
    )
    parser.add_argument(
        "--scores",
        nargs="+",
        default=["energy", "msp"],
        help="scores; the first is reported for every shaping, the others for 'none' only",
    )
    parser.add_argument(
        "--detectors",
        nargs="+",
        default=[],
        help="detector specs (knn@50, vim@32, odin, ...): a second run with shaping none, and their cost",
    )
    parser.add_argument("--cost-rounds", type=int, default=5, help="timed rounds of the extra cost per batch")
    parser.add_argument(
        "--react-percentile",
        type=float,
        default=90.0,
        help="append react@<t>, t = this percentile of the training-PNG penultimate "
        "activations (0: no fixed-threshold ReAct row)",
    )
    parser.add_argument(
        "--fit",
        metavar="NPZ",
        help="ID data for calibrated methods (data.fit): an .npz path, or a file name under $DATASETS",
    )
    parser.add_argument(
        "--fit-every",
        type=int,
        metavar="N",
        help="fit calibrated methods on every N-th ID image (select '0::N') and test on the others "
        "(exclude '0::N'): a split of the ID arrays that testing never sees",
    )
    parser.add_argument("--section", default="cifar10_ood", help="BENCHMARKS.md section (marker name) to replace")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument(
        "--limit",
        type=int,
        help="use a fixed random subset of this many images per set (quick check; nothing is written to BENCHMARKS.md)",
    )
    parser.add_argument("--no-write", action="store_true", help="print the section without writing BENCHMARKS.md")
    return parser.parse_args(argv)


def data_config(args: argparse.Namespace) -> dict[str, Any]:
    """The ``data`` block: CIFAR-10 (JPEG q75) as ID, the four OOD sets, near/far groups, optional fit data."""
    extra = {} if args.limit is None else {"limit": args.limit}
    data: dict[str, Any] = {
        "id": npz_spec(ID_FILE, name="cifar10", **extra),
        "ood": {name: npz_spec(file, **extra) for name, file in OOD_FILES.items()},
        "groups": GROUPS,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
    }
    if args.fit:
        data["fit"] = npz_spec(args.fit) if os.sep not in args.fit else {"kind": "npz", "path": args.fit}
    if args.fit_every:
        data["fit"] = npz_spec(ID_FILE, select=f"0::{args.fit_every}")
        data["id"]["exclude"] = f"0::{args.fit_every}"
    return data


def penultimate_percentile(backbone: str, percentile: float, data: dict[str, Any]) -> tuple[float, tuple[int, int]]:
    """The ``percentile`` of all penultimate activations (the classifier's input) of ``backbone`` on the
    lossless CIFAR-10 training PNGs, and the shape (images, features) of the activations it was taken over."""
    model = create_backbone(backbone, checkpoint_path=f"$DATASETS/{checkpoint_file(backbone)}")
    datamodule = OODDataModule(
        id=data["id"], ood=data["ood"], fit=npz_spec(TRAIN_FILE), backbone=backbone, batch_size=data["batch_size"]
    )
    module, _ = resolve_hook_point(model, "penultimate")
    features: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _, inputs: features.append(inputs[0].flatten(1)))
    with torch.inference_mode():
        for x, _, _ in datamodule.fit_dataloader():
            model(x)
    handle.remove()
    values = torch.cat(features)
    return float(np.percentile(values.numpy(), percentile)), tuple(values.shape)


def run_sweep(
    backbone: str,
    shapings: list[str],
    scores: list[str],
    data: dict[str, Any],
    args: argparse.Namespace,
    out_dir: Path,
    version: str,
) -> tuple[dict, float, str]:
    """Write the config (``data`` is its data block), run ``main.py test`` on it, logging under ``version``; the
    results, the wall time (s) and the config path."""
    config = {
        "seed_everything": 0,
        "model": {
            "backbone": backbone,
            "checkpoint_path": f"$DATASETS/{checkpoint_file(backbone)}",
            "shaping": shapings,
            "placement": "penultimate",
            "score": scores,
        },
        "data": data,
        "trainer": {
            "accelerator": "auto",
            "devices": 1,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                "init_args": {
                    "save_dir": str(out_dir.parent.relative_to(REPO)),
                    "name": out_dir.name,
                    "version": version,
                },
            },
        },
    }
    shutil.rmtree(out_dir / version, ignore_errors=True)  # the log dir: no stale results or event files
    config_path = out_dir / f"{version}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    rel_config = str(config_path.relative_to(REPO))
    log_path = out_dir / f"{version}.log"
    print(f"[{version}] python main.py test --config {rel_config}  (log: {log_path.relative_to(REPO)})", flush=True)
    LOADS.append(os.getloadavg()[0])
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, "main.py", "test", "--config", rel_config],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    wall = time.perf_counter() - start
    LOADS.append(os.getloadavg()[0])
    if proc.returncode != 0:
        sys.exit(
            f"error: main.py test failed for {backbone} (exit {proc.returncode}); the end of "
            f"{log_path}:\n{log_path.read_text()[-3000:]}"
        )
    results_path = out_dir / version / "ood_results.json"
    return json.loads(results_path.read_text()), wall, rel_config


def reported_runs(results: dict[str, Any], scores: list[str]) -> list[dict[str, Any]]:
    """The runs shown: the first score for every shaping, the other scores for shaping ``none`` only."""
    return [run for run in results["runs"] if run["score"] == scores[0] or run["shaping"] == "none"]


def baseline_accuracy(results: dict[str, Any]) -> float | None:
    """The ID accuracy without shaping (of the first run when no run is unshaped)."""
    return next((r for r in results["runs"] if r["shaping"] == "none"), results["runs"][0])["id_accuracy"]


@dataclass(frozen=True)
class DetectorRun:
    """The detectors' ``main.py test`` run of one model."""

    results: dict[str, Any]
    wall: float
    config: str


@dataclass(frozen=True)
class Costs:
    """Extra cost per batch, measured in one interleaved run: the forward pass's seconds and, per shaping spec
    (as the results name it) and per detector spec, extra seconds / forward-pass seconds."""

    forward_seconds: float
    shapings: dict[str, float]
    detectors: dict[str, float]


def extra_costs(
    backbone: str,
    shapings: list[str],
    score: str,
    detectors: list[str],
    data: dict[str, Any],
    batch_size: int,
    rounds: int,
) -> Costs:
    """Seconds of the backbone's forward pass on the first ``batch_size`` ID test images and, divided by it, the
    extra seconds on that batch of each shaping setting (its part of a sweep with ``score``: from the part of the
    pass a sweep shares, ``shared_part``, the rest with the shaping attached, then the score; calibrated shapings
    fitted with ``calibrate_shapers`` on ``data["fit"]``) and of each detector (fitted with ``fit_detector`` on
    ``data["fit"]``), all timed in the same interleaved rounds."""
    model = create_backbone(backbone, checkpoint_path=f"$DATASETS/{checkpoint_file(backbone)}").eval()
    datamodule = OODDataModule(
        id=data["id"], ood=data["ood"], fit=data.get("fit"), backbone=backbone, batch_size=batch_size
    )
    x, _, _ = next(iter(datamodule.test_dataloader()[0]))
    std = datamodule.data_config()["std"]
    forward = FeaturesAndLogits(model)
    with torch.inference_mode():
        features, logits = forward(x)
    score_fn = get_score(score)
    requested = [get_shaping(spec) for spec in shapings]
    shapers = calibrate_shapers(requested, model, "penultimate", FitPass(datamodule.fit_dataloader))
    timers: dict[str, Any] = {"forward": lambda: forward(x)}
    for spec, shaper in zip(requested, shapers, strict=True):
        with torch.inference_mode():
            shared = shared_part(model, x, "penultimate", [shaper])  # as a sweep with this setting shares it
        timers[f"shaping {spec.spec}"] = lambda s=shaper, h=shared: score_fn(
            outputs_from_shared(model, h, [s], "penultimate").logits[0]
        )
    gradients = []
    for spec in detectors:
        fitted = fit_detector(model, spec, datamodule.fit_dataloader())
        if isinstance(fitted.detector, FeatureDetector):
            timers[fitted.spec] = lambda f=fitted: f.score(features, logits)
        else:
            timers[fitted.spec] = lambda f=fitted: detector_scores(model, f, x, std=std)
            gradients.append(fitted.spec)
    median = interleaved_medians(timers, rounds, with_gradients=gradients)
    base = median.pop("forward")
    prefix = "shaping "
    return Costs(
        base,
        {name.removeprefix(prefix): t / base for name, t in median.items() if name.startswith(prefix)},
        {name: t / base for name, t in median.items() if not name.startswith(prefix)},
    )


def _cost(ratio: float | None) -> str:
    """An extra cost relative to the forward pass: ``+0.03%``, ``+3.20%``, ``+305.1%``; an em dash for None."""
    return "—" if ratio is None else f"+{100 * ratio:.{2 if ratio < 0.1 else 1}f}%"


def row_cost(run: dict[str, Any], first_score: str, costs: Costs) -> float | None:
    """The measured extra cost of a table row: its detector's, else its shaping's for the first score, else None."""
    if run["shaping"] == "none" and run["score"] in costs.detectors:
        return costs.detectors[run["score"]]
    return costs.shapings.get(run["shaping"]) if run["score"] == first_score else None


def model_section(
    backbone: str,
    results: dict[str, Any],
    scores: list[str],
    wall: float,
    config: str,
    react_note: str,
    costs: Costs,
    detectors: DetectorRun | None = None,
) -> str:
    """The Markdown of one model: mean and group metrics with each row's extra cost, then per-set metrics, of the
    reported runs (and of the detector runs)."""
    fkey = fpr_key(results["tpr"])
    runs = reported_runs(results, scores) + ([] if detectors is None else detectors.results["runs"])
    images = sum(results["counts"].values())
    accuracy = baseline_accuracy(results)
    published = PUBLISHED_ACCURACY.get(backbone)
    summary = markdown_table(
        [
            "shaping",
            "score",
            f"mean {fkey.upper()} ↓",
            "mean AUROC ↑",
            "mean AUPR-In ↑",
            *[f"{g} {fkey.upper()} ↓" for g in results["groups"]],
            "ID acc %",
            "extra cost ÷ forward",
        ],
        [
            [
                r["shaping"],
                r["score"],
                pct(r["mean"][fkey]),
                pct(r["mean"]["auroc"]),
                pct(r["mean"]["aupr_in"]),
                *[pct(m[fkey]) for m in r["groups"].values()],
                pct(r["id_accuracy"]),
                _cost(row_cost(r, scores[0], costs)),
            ]
            for r in runs
        ],
        "llrrrrrrr",
    )
    per_set = markdown_table(
        ["shaping", "score", *results["ood_sets"]],
        [
            [
                r["shaping"],
                r["score"],
                *[" / ".join(pct(r["ood"][s][k]) for k in (fkey, "auroc", "aupr_in")) for s in results["ood_sets"]],
            ]
            for r in runs
        ],
        "ll" + "r" * len(results["ood_sets"]),
    )
    return "\n".join(
        [
            f"### {backbone}",
            "",
            f"ID accuracy without shaping {pct(accuracy)}% on the JPEG-q75 test set (published, lossless test set: "
            f"{pct(published)}%). {react_note}",
            f"Wall time of `main.py test` (process start to exit, {images:,} images, {len(results['runs'])} "
            f"(shaping, score) runs in one backbone pass per batch): **{wall:.0f} s** ({images / wall:.0f} img/s "
            "including start-up).",
            f"Config written and run by the script: `python main.py test --config {config}`.",
            *([] if detectors is None else [_detector_note(detectors)]),
            _cost_note(costs, images, scores[0]),
            "",
            f"Mean over the {len(results['ood_sets'])} OOD sets, in %; groups: "
            + "; ".join(f"{g} = {', '.join(m)}" for g, m in results["groups"].items())
            + ".",
            "",
            summary,
            "",
            f"Per OOD set, {fkey.upper()} / AUROC / AUPR-In in %:",
            "",
            per_set,
        ]
    )


def _detector_note(run: DetectorRun) -> str:
    """How the detector rows were run."""
    return (
        f"Detector rows: a second `main.py test` run (shaping none × {len(run.results['runs'])} detectors, fitted "
        f"on the fit split), wall time **{run.wall:.0f} s**, config `{run.config}`."
    )


def _cost_note(costs: Costs, images: int, score: str) -> str:
    """How the extra cost column was measured."""
    return (
        "Extra cost ÷ forward: measured in the same script run on one batch of ID test images, relative to the "
        f"backbone's forward pass ({costs.forward_seconds * 1e3:.0f} ms per batch; {images:,} images in all), "
        "median of interleaved rounds. A shaping row costs what its setting adds to a sweep's batch: the "
        f"classifier with the shaping attached on the batch's penultimate features, then {score} (for `none` the "
        "classifier and score alone; for `rankfeat` the last stage's two branches from its input); feature-space "
        "detectors score the batch's features and logits, odin and adascale run their own passes (gradients to "
        "the input)."
    )


def header(args: argparse.Namespace, data: dict[str, Any], accuracies: dict[str, float]) -> str:
    """What was measured and on which ``data`` block; ``accuracies`` are the unshaped ID accuracies per model."""
    fit = f" `data.fit`: `{data['fit']['path']}`." if args.fit else ""
    if args.fit_every:
        fit = (
            f" **Fit/test split**: calibrated methods are fitted on every {args.fit_every}th image of the ID "
            f"array (`select: '0::{args.fit_every}'`, stratified since the array is sorted by class) and every "
            f"row is tested on the other images (`exclude: '0::{args.fit_every}'`), so the fit data is never "
            "tested on."
        )
    ood = "\n".join(f"- `{name}`: {OOD_DESCRIPTIONS[name]}." for name in OOD_FILES)
    measured = ", ".join(f"{pct(acc)}% ({name})" for name, acc in accuracies.items())
    published = ", ".join(f"{pct(PUBLISHED_ACCURACY.get(name))}%" for name in accuracies)
    return "\n".join(
        [
            f"## CIFAR-10 OOD benchmark ({args.section})",
            "",
            f"Generated by `{command_line()}` on {machine_line()}.",
            "",
            f"**Machine load**: the 1-minute load average ({os.cpu_count()} cores) was "
            f"{min(LOADS):.1f}–{max(LOADS):.1f} across {len(LOADS)} samples taken at the start and before and after "
            "each step of this run"
            + (
                ", more runnable jobs than cores: other jobs shared the machine, so wall times are upper bounds and "
                "the costs carry the noise of its varying speed."
                if max(LOADS) > (os.cpu_count() or 1)
                else "."
            ),
            "",
            "**ID set**: the CIFAR-10 *test* set (10,000 images), but stored as **JPEG at quality 75** (no lossless "
            "copy was available, see `$DATASETS/SOURCES.md`). JPEG compression of 32×32 images is why the ID "
            f"accuracy here is {measured} rather than the published {published} on the lossless test set; OOD "
            "numbers are therefore not directly comparable with papers that use the lossless set.",
            "",
            "**OOD sets** (from `SOURCES.md`):",
            ood,
            "",
            'Metrics are the "paper" convention (ID = positive class): FPR at 95% TPR, AUROC, AUPR-In. Weights: '
            f"akamaster `pytorch_resnet_cifar10` checkpoints. Batch size {args.batch_size}, {args.num_workers} data "
            f"workers. Shaping placement: penultimate (the pooled features).{fit}"
            + ("" if args.limit is None else f" **Quick check on {args.limit} images per set, not the full sets.**"),
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    LOADS.append(os.getloadavg()[0])
    if args.detectors and not (args.fit or args.fit_every):
        sys.exit("error: --detectors needs fit data: add --fit-every N (a split of the ID set) or --fit NPZ.")
    files = [ID_FILE, TRAIN_FILE, *OOD_FILES.values(), *map(checkpoint_file, args.models)]
    if args.fit and os.sep not in args.fit:
        files.append(args.fit)
    datasets_dir(files)
    out_dir = REPO / "runs" / "bench" / args.section
    out_dir.mkdir(parents=True, exist_ok=True)
    data = data_config(args)
    sections, accuracies = [], {}
    for backbone in args.models:
        shapings = list(args.shapings)
        react_note = ""
        if args.react_percentile:
            threshold, (count, width) = penultimate_percentile(backbone, args.react_percentile, data)
            shapings.append(f"react@{threshold:.2f}")
            react_note = (
                f"ReAct threshold {threshold:.2f} = the {args.react_percentile:g}th percentile of all "
                f"{count}×{width} penultimate activations of the {count} lossless "
                f"CIFAR-10 training PNGs (`{TRAIN_FILE}`), rounded to 2 decimals; no test data was used."
            )
            print(f"[{backbone}] {react_note}", flush=True)
        results, wall, config = run_sweep(backbone, shapings, args.scores, data, args, out_dir, backbone)
        detectors = None
        if args.detectors:
            detectors = DetectorRun(
                *run_sweep(backbone, ["none"], args.detectors, data, args, out_dir, f"{backbone}_detectors")
            )
        print(f"[{backbone}] measuring the extra cost per batch", flush=True)
        costs = extra_costs(backbone, shapings, args.scores[0], args.detectors, data, args.batch_size, args.cost_rounds)
        LOADS.append(os.getloadavg()[0])
        sections.append(model_section(backbone, results, args.scores, wall, config, react_note, costs, detectors))
        accuracies[backbone] = baseline_accuracy(results)
    publish(
        args.section,
        "\n\n".join([header(args, data, accuracies), *sections]),
        write=not args.no_write and args.limit is None,
    )


if __name__ == "__main__":
    main()
