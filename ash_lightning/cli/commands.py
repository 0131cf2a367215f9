"""The commands ``main.py`` answers without the LightningCLI: ``report``, ``list``, the help texts, and the
training commands it refuses (``fit``, ``validate``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ash_lightning.errors import UserError

COMMANDS_HELP = """usage: main.py <command> [options]    (main.py <command> --help lists a command's options)

Evaluate activation shaping for OOD detection on any timm backbone, with a trained model.

commands:
  test      OOD metrics per data set of a config: main.py test --config configs/X.yaml
  predict   flag new images as OOD with a run's chosen detector: main.py predict --from_run RUN --data.predict SPEC
  report    recompute the metrics table from a run directory or scores.npz, without the model
  list      every shaping, score and detector spec form, with a one-line description

options:
  -h, --help  show this message and exit
  --verbose   keep Lightning's tips and accelerator lines in the output
  --debug     full traceback on errors (same as ASH_DEBUG=1)"""

REPORT_USAGE = """usage: main.py report <run directory | scores.npz> [--tpr TPR] [--convention {paper,openood}]

Recompute and print the metrics table from the scores a `main.py test` run saved (scores.npz in its log
directory), without the model; also after an interrupted run. Writes ood_results.json/.csv next to them.

options:
  --tpr TPR          TPR of the FPR metric, in (0, 1] (default: the run's)
  --convention NAME  paper (ID positive) or openood (OOD positive) (default: the run's)"""

LIST_USAGE = """usage: main.py list

Print every spec form main.py and the callbacks accept, with a one-line description: shapings (model.shaping,
ActivationShapingCallback), scores and detectors (model.score, ood_metrics.score)."""

TRAINING_COMMANDS = ("fit", "validate")


def command_help(args: list[str]) -> int | None:
    """Answer ``main.py``, ``main.py --help``, ``main.py report|list --help`` and the training commands ``fit`` and
    ``validate`` (one error line, exit 2: this tool evaluates trained models); the exit status, or None for a
    command line that the commands themselves handle."""
    if not args or args[0] in ("-h", "--help"):
        print(COMMANDS_HELP, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    usages = {"report": REPORT_USAGE, "list": LIST_USAGE}
    if args[0] in usages and any(a in ("-h", "--help") for a in args[1:]):
        print(usages[args[0]])
        return 0
    if args[0] in TRAINING_COMMANDS:
        print(
            f"error: `main.py {args[0]}` is not available: this tool evaluates trained models (test, predict, "
            "report). Fix: train your model with Lightning (`Trainer.fit(model, datamodule)` or your own "
            "LightningCLI), then evaluate its checkpoint with `main.py test --config ... "
            "--model.checkpoint_path <checkpoint>`.",
            file=sys.stderr,
        )
        return 2
    return None


class _ReportParser(argparse.ArgumentParser):
    """``main.py report`` arguments; a usage mistake is a UserError (one ``error:`` line, exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}. Usage: {self.format_usage().strip().removeprefix('usage: ')}")


def report(args: list[str]) -> None:
    """Recompute and print the metrics table from a run directory or scores.npz, without a model; ``--tpr`` and
    ``--convention`` override the values the run used. The table is printed before ``ood_results.json``/``.csv``
    are written beside the scores, so a folder that cannot be written (full disk, read-only) still shows it,
    then ends in one UserError naming the folder."""
    from ash_lightning._options import CONVENTIONS, check_convention, check_tpr
    from ash_lightning.errors import write_failures_reported
    from ash_lightning.evaluation.results import format_table, results_from_store, write_results
    from ash_lightning.evaluation.score_store import load_scores

    parser = _ReportParser(prog="main.py report", add_help=False)
    parser.add_argument("path", help="a run directory or its scores.npz")
    parser.add_argument("--tpr", type=float, help="TPR of the FPR metric, in (0, 1]")
    parser.add_argument("--convention", help=f"one of {CONVENTIONS}")
    opts = parser.parse_args(args)
    if opts.tpr is not None:
        check_tpr("--tpr", opts.tpr)
    if opts.convention is not None:
        check_convention("--convention", opts.convention)
    store, meta = load_scores(opts.path)
    results = results_from_store(store, meta, tpr=opts.tpr, convention=opts.convention)
    path = opts.path
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    print(format_table(results), flush=True)
    elsewhere = "copy the run folder there and run main.py report on the copy"
    with write_failures_reported(directory, "ood_results.json/.csv", elsewhere):
        json_path, _ = write_results(results, directory)
    missing = (
        f"\nNot in the saved scores (the run stopped before them): {', '.join(results['missing'])}"
        if results["missing"]
        else ""
    )
    print(f"\nRecomputed from saved scores; written to {json_path}{missing}")


def list_specs(args: list[str]) -> None:
    """Print every shaping, score and detector spec form with its one-line description."""
    from ash_lightning._registry import Registered
    from ash_lightning.detectors.spec import list_detectors
    from ash_lightning.scores.specs import list_scores
    from ash_lightning.shaping.specs import list_shapings

    if args:
        raise UserError(f"main.py list takes no arguments, got {' '.join(args)}. Usage: main.py list")
    sections: dict[str, Sequence[Registered[Any]]] = {
        "shapings": list_shapings(),
        "scores": list_scores(),
        "detectors": list_detectors(),
    }
    width = max(len(entry.form) for entries in sections.values() for entry in entries)
    blocks = [
        f"{title}:\n" + "\n".join(f"  {entry.form:<{width}}  {entry.description}" for entry in entries)
        for title, entries in sections.items()
    ]
    print("\n\n".join(blocks))
