"""Command line: ``python main.py test --config configs/X.yaml`` (a LightningCLI) and ``main.py report RUN``.

``main`` reads the global flags once (``--verbose``: Lightning's tips and accelerator lines stay in the output,
``cli.logs``; ``--debug``: tracebacks), answers help and the commands without a model (``cli.commands``), runs the
LightningCLI wired here for ``test``/``predict``, and turns what stopped it into the exit status
(``cli.exit_codes``): errors a user can cause (bad path, spec, checkpoint, data, config key or value) end in one
message and exit status 2; set ``ASH_DEBUG=1`` (or pass ``--debug``) to see the full traceback. A run stopped by
SIGTERM or Ctrl+C keeps the data sets it finished and exits 143 or 130 (128 + the signal).
"""

from __future__ import annotations

import os
import sys

from ash_lightning._files import writable_directory
from ash_lightning.cli.allocator import keep_freed_memory_unless_disabled
from ash_lightning.cli.commands import command_help, list_specs, report
from ash_lightning.cli.exit_codes import DEBUG_ENV, USER_ERROR, stopping_signal, user_error
from ash_lightning.cli.logs import quiet_unless_verbose
from ash_lightning.errors import UserError
from ash_lightning.lightning_packages import MAIN_PACKAGE, main_package_class

#: The flags ``main.py`` takes before or after any command, and removes before the command sees its arguments.
GLOBAL_FLAGS = ("--verbose", "--debug")


class _CLI:
    """The LightningCLI subclass, built lazily so ``report`` and ``--help`` of it stay light."""

    @staticmethod
    def run(args: list[str] | None) -> None:
        from ash_lightning.callbacks import OODMetricsCallback
        from ash_lightning.callbacks.interrupt import StopAfterBatchOnCtrlC
        from ash_lightning.cli.yaml_config import use_strict_yaml
        from ash_lightning.data import OODDataModule
        from ash_lightning.module import OODEvalModule

        use_strict_yaml()

        class OODCLI(main_package_class("cli", "LightningCLI")):  # type: ignore[misc]  # of MAIN_PACKAGE
            def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
                parser.add_lightning_class_args(OODMetricsCallback, "ood_metrics")
                parser.set_defaults({"ood_metrics.verbose": False})  # after_test prints the table
                parser.link_arguments("model.backbone", "data.backbone")

            def before_instantiate_classes(self) -> None:
                check_accelerator(self.config[self.subcommand].trainer.accelerator)

            def before_test(self) -> None:
                for logger in self.trainer.loggers:
                    save_dir = getattr(logger, "save_dir", None)
                    if save_dir:
                        writable_directory(save_dir, "trainer.logger save_dir")

            def after_test(self) -> None:
                check_batches_evaluated(self.trainer.num_test_batches)
                metrics = [cb for cb in self.trainer.callbacks if isinstance(cb, OODMetricsCallback)]
                if self.trainer.is_global_zero and metrics and metrics[0].summary:
                    print(metrics[0].summary)

        OODCLI(
            OODEvalModule,
            OODDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "callbacks": [StopAfterBatchOnCtrlC()],
                "logger": {
                    "class_path": f"{MAIN_PACKAGE}.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "ood", "default_hp_metric": False},
                },
            },
            parser_kwargs={
                "description": "Evaluate activation shaping for OOD detection on any timm backbone.",
                "exit_on_error": False,
            },
        )


def check_accelerator(accelerator: object) -> None:
    """A UserError when ``trainer.accelerator`` names a device kind this machine lacks (``gpu`` means CUDA or MPS)."""
    registry = main_package_class("accelerators", "AcceleratorRegistry")
    if not isinstance(accelerator, str):
        return
    kinds = {"gpu": ("cuda", "mps")}.get(accelerator, (accelerator,))
    if all(k in registry for k in kinds) and not any(registry[k]["accelerator"].is_available() for k in kinds):
        raise UserError(
            f"trainer.accelerator: {accelerator!r}, but this machine has no such device. Fix: set "
            "trainer.accelerator: cpu (or auto, which picks a GPU when there is one)."
        )


def check_batches_evaluated(num_batches: list[int | float]) -> None:
    """A UserError when the test loop had no batch to evaluate (e.g. ``trainer.limit_test_batches: 0``): Lightning
    then skips testing silently, with no table, no file and exit status 0."""
    if not sum(num_batches):
        raise UserError(
            "no test batch was evaluated, so there are no results (trainer.limit_test_batches is 0, or "
            "every data set gives 0 batches). Fix: remove trainer.limit_test_batches or set it to a "
            "positive count or fraction."
        )


def global_flags(args: list[str]) -> tuple[list[str], set[str]]:
    """``args`` without ``GLOBAL_FLAGS``, and the flags given. They leave ``sys.argv`` too: DDP launchers re-run
    it, and the workers inherit what the flags set in the environment instead."""
    given = {a for a in args if a in GLOBAL_FLAGS}
    if given:
        sys.argv = [a for a in sys.argv if a not in GLOBAL_FLAGS]
    return [a for a in args if a not in GLOBAL_FLAGS], given


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``); returns the exit status: 2 for a user error, 130 for
    Ctrl+C (SIGINT) and 143 for SIGTERM, the shells' 128 + signal number, after the finished sets were saved."""
    args, flags = global_flags(list(sys.argv[1:] if argv is None else argv))
    quiet_unless_verbose("--verbose" in flags)
    status = command_help(args)
    if status is not None:
        return status
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in flags
    try:
        if args[:1] == ["report"]:
            report(args[1:])
        elif args[:1] == ["list"]:
            list_specs(args[1:])
        else:
            keep_freed_memory_unless_disabled()
            _CLI.run(None if argv is None else args)
    except (KeyboardInterrupt, SystemExit) as stop:
        signum = stopping_signal(stop)
        if signum is None:
            raise
        print(f"error: stopped by {signum.name} before every data set was evaluated", file=sys.stderr)
        return 128 + signum
    except Exception as err:  # noqa: BLE001 (anything not caused by the user is re-raised below)
        cause = user_error(err)
        if debug or cause is None:
            raise
        print(f"error: {cause}\n(set {DEBUG_ENV}=1 or pass --debug for the traceback)", file=sys.stderr)
        return USER_ERROR
    return 0
