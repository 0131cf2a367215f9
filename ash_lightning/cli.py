"""Command line: ``python main.py test --config configs/X.yaml`` (a LightningCLI) and ``main.py report RUN``.

Errors a user can cause (bad path, spec, checkpoint, data, config key) end in one message and exit status 2;
set ``ASH_DEBUG=1`` (or pass ``--debug``) to see the full traceback.
"""
from __future__ import annotations

import os
import sys

from ash_lightning.errors import UserError

DEBUG_ENV = "ASH_DEBUG"


class _CLI:
    """The LightningCLI subclass, built lazily so ``report`` and ``--help`` of it stay light."""

    @staticmethod
    def run(args: list[str] | None) -> None:
        from pytorch_lightning.cli import LightningCLI

        from ash_lightning.data import OODDataModule
        from ash_lightning.module import OODEvalModule
        from callbacks import OODMetricsCallback

        class OODCLI(LightningCLI):
            def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
                parser.add_lightning_class_args(OODMetricsCallback, "ood_metrics")
                parser.link_arguments("model.backbone", "data.backbone")

        OODCLI(OODEvalModule, OODDataModule, args=args, save_config_kwargs={"overwrite": True},
               trainer_defaults={"logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                                            "init_args": {"save_dir": "runs", "name": "ood"}}},
               parser_kwargs={"description": "Evaluate activation shaping for OOD detection on any timm backbone."})


def report(path: str) -> None:
    """Recompute and print the metrics table from a run directory or scores.npz, without a model."""
    from ash_lightning.results import format_table, load_scores, results_from_store, write_results

    store, meta = load_scores(path)
    results = results_from_store(store, meta)
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    json_path, _ = write_results(results, directory)
    print(format_table(results) + f"\n\nRecomputed from saved scores; written to {json_path}")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in args
    if "--debug" in args:
        sys.argv = [a for a in sys.argv if a != "--debug"]  # DDP launchers re-run sys.argv
        args.remove("--debug")
    try:
        if args[:1] == ["report"]:
            if len(args) != 2:
                raise UserError("usage: main.py report <run directory | scores.npz>")
            report(args[1])
        else:
            _CLI.run(None if argv is None else args)
    except (UserError, FileNotFoundError) as err:
        if debug:
            raise
        print(f"error: {err}\n(set {DEBUG_ENV}=1 or pass --debug for the traceback)", file=sys.stderr)
        return 2
    return 0
