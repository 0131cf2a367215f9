"""Benchmark: what each detector and calibrated shaper adds to a ResNet-20 CIFAR-10 evaluation batch, relative to the
forward pass.

Model ``cifar_resnet20`` (random weights), a batch of 250 random 32x32 inputs, 2 threads, CPU. Feature-space
detectors are fitted on the features of 9,000 random inputs (random labels for mds/rmds/mdspp/she), then the time of
``fitted.score(features, logits)`` per batch is divided by the time of the batch's forward pass (target: at
most 10%). ODIN and AdaSCALE run their own passes (forward + backward to the input + a second forward), so they
are reported as the multiple of one forward pass they take; GradNorm is in closed form on the features and
logits, so it is timed like the feature-space detectors. The calibrated shapers (``SHAPER_SPECS``) are fitted on
the same 9,000 inputs (one fit pass, ``calibrate_shapers``), and the time of ``shaper(features)`` per batch (the
work a sweep adds to the classifier per setting) is divided by the forward pass (target: at most 10%).
Measurements are interleaved (forward, then every detector and shaper, per round) and the median over rounds is
reported.

Run: ``PYTHONPATH=. python bench/detector_cost.py`` (``--write`` puts the section ``detector_cost`` into
BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import timm
import torch

import ash_lightning.models  # noqa: F401  (registers cifar_resnet20 in timm)
from ash_lightning.data.fit_pass import FitPass
from ash_lightning.detectors import FeatureDetector, FeaturesAndLogits, FittedDetector, parse_detector
from ash_lightning.shaping.calibration import calibrate_shapers
from ash_lightning.shaping.specs import get_shaping

from _common import command_line, interleaved_medians, machine_line, markdown_table, publish

FEATURE_SPECS = (
    *("mds", "rmds", "knn@50", "knn@50@0.1", "vim@32", "fdbd", "nnguide@10", "nnguide@100", "gradnorm"),
    *("she", "klm", "residual@32", "nci", "neco", "mdspp", "cadref", "caref"),
)
PASS_SPECS = ("odin@1000@0.0014", "adascale")
SHAPER_SPECS = ("react@p90", "bfact@95", "ras", "optfs")
TARGET = 0.10
STD = (0.229, 0.224, 0.225)  # the ImageNet std the CIFAR ResNet checkpoints normalise with


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--bank", type=int, default=9000, help="fit samples (the KNN/NNGuide bank)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds after one warm-up round")
    parser.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = timm.create_model("cifar_resnet20").eval()
    forward = FeaturesAndLogits(model)
    classifier = model.get_classifier()
    weight, bias = classifier.weight.detach(), classifier.bias.detach()
    fit_inputs = torch.randn(args.bank, 3, 32, 32).split(250)
    with torch.inference_mode():
        fit = [forward(x) for x in fit_inputs]
    fit_features, fit_logits = torch.cat([h for h, _ in fit]), torch.cat([logits for _, logits in fit])
    fit_labels = torch.randint(0, fit_logits.shape[1], (args.bank,))

    fitted: dict[str, FittedDetector] = {}
    for spec in FEATURE_SPECS:
        detector = parse_detector(spec)
        assert isinstance(detector, FeatureDetector)
        fitted[spec] = detector.fit(fit_features, fit_logits, fit_labels, weight, bias)
    adascale = parse_detector("adascale")
    fit_batches = torch.randn(2 * args.batch_size, 3, 32, 32).split(args.batch_size)
    fitted["adascale"] = adascale.fit(torch.cat([adascale.fit_shifts(forward, x) for x in fit_batches]))
    odin = parse_detector("odin@1000@0.0014")
    requested = [get_shaping(spec) for spec in SHAPER_SPECS]
    calibrated = calibrate_shapers(requested, model, "penultimate", FitPass(lambda: fit_inputs))
    shapers = dict(zip(SHAPER_SPECS, calibrated, strict=True))

    x = torch.randn(args.batch_size, 3, 32, 32)
    with torch.inference_mode():
        features, logits = forward(x)
    timers: dict[str, Callable[[], object]] = {"forward": lambda: forward(x)}
    for spec in FEATURE_SPECS:
        timers[spec] = lambda f=fitted[spec]: f.score(features, logits)
    timers["odin@1000@0.0014"] = lambda: odin.score(model, x, STD)
    timers["adascale"] = lambda: fitted["adascale"].score(forward, x, weight, bias)
    for spec, shaper in shapers.items():
        timers[f"shaper {spec}"] = lambda s=shaper: s(features)

    loads = [os.getloadavg()[0]]
    median = interleaved_medians(timers, args.rounds, with_gradients=PASS_SPECS)
    loads.append(os.getloadavg()[0])

    base = median["forward"]
    rows = [
        [
            spec,
            f"{median[spec] * 1e3:.2f}",
            f"{median[spec] / base:.1%}",
            "yes" if median[spec] / base <= TARGET else "NO",
        ]
        for spec in FEATURE_SPECS
    ]
    detectors = markdown_table(["detector", "ms per batch", "÷ forward pass", f"≤ {TARGET:.0%}"], rows, "lrrl")
    rows = [[spec, f"{median[spec] * 1e3:.1f}", f"{median[spec] / base:.2f}x"] for spec in PASS_SPECS]
    passes = markdown_table(["detector (own passes)", "ms per batch", "multiple of one forward pass"], rows, "lrr")
    rows = []
    for spec in SHAPER_SPECS:
        ratio = median[f"shaper {spec}"] / base
        rows.append([spec, f"{median[f'shaper {spec}'] * 1e3:.3f}", f"{ratio:.2%}", "yes" if ratio <= TARGET else "NO"])
    shapers = markdown_table(["calibrated shaper", "ms per batch", "÷ forward pass", f"≤ {TARGET:.0%}"], rows, "lrrl")
    over = [spec for spec in FEATURE_SPECS if median[spec] / base > TARGET]
    over += [spec for spec in SHAPER_SPECS if median[f"shaper {spec}"] / base > TARGET]
    text = "\n".join(
        [
            "## Extra cost of the detectors and calibrated shapers per batch (detector_cost)",
            "",
            f"Generated by `{command_line()}` on {machine_line()}; 1-minute load average "
            f"{loads[0]:.1f} before and {loads[1]:.1f} after the timed rounds ({os.cpu_count()} cores).",
            "",
            f"cifar_resnet20 (random weights), batch {args.batch_size} of random inputs, fit bank {args.bank}, "
            f"{args.threads} threads, median of {args.rounds} interleaved rounds; forward pass "
            f"{base * 1e3:.1f} ms per batch. Target: feature-space and logit methods add at most {TARGET:.0%} to "
            "the forward pass.",
            "",
            detectors,
            "",
            passes,
            "",
            shapers,
            "",
            "Over the target: " + (", ".join(over) if over else "none") + ".",
        ]
    )
    publish("detector_cost", text, args.write)


if __name__ == "__main__":
    main()
