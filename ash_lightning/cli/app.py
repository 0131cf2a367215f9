"""Command line: ``python main.py test --config configs/X.yaml`` (a LightningCLI), ``main.py predict --from_run RUN
--data.predict SPEC`` (the run's chosen detector on new data, ``ash_lightning.deploy``) and ``main.py report RUN``.

``main`` reads the global flags once (``--verbose``: Lightning's tips and accelerator lines stay in the output,
``cli.logs``; ``--debug``: tracebacks), answers help and the commands without a model (``cli.commands``), runs the
LightningCLI wired here for ``test``/``predict``, and turns what stopped it into the exit status
(``cli.exit_codes``): errors a user can cause (bad path, spec, checkpoint, data, config key or value) end in one
message and exit status 2; set ``ASH_DEBUG=1`` (or pass ``--debug``) to see the full traceback. A run stopped by
SIGTERM or Ctrl+C keeps the data sets it finished and exits 143 or 130 (128 + the signal).
"""

from __future__ import annotations

import sys
from typing import Any

from ash_lightning._files import writable_directory
from ash_lightning.cli.allocator import keep_freed_memory_unless_disabled
from ash_lightning.cli.commands import command_help, list_specs, report
from ash_lightning.cli.exit_codes import USER_ERROR, stopping_signal, user_error
from ash_lightning.cli.logs import quiet_unless_verbose
from ash_lightning.errors import DEBUG_ENV, UserError, debug_requested, write_failures_reported
from ash_lightning.lightning_packages import MAIN_PACKAGE, main_package_class

#: The flags ``main.py`` takes before or after any command, and removes before the command sees its arguments.
GLOBAL_FLAGS = ("--verbose", "--debug")


class _CLI:
    """The LightningCLI subclass, built lazily so ``report`` and ``--help`` of it stay light."""

    @staticmethod
    def run(args: list[str] | None, command: str | None) -> None:
        """LightningCLI on ``args`` (None: ``sys.argv``), with the parser of ``command`` only when it names one."""
        from ash_lightning.callbacks import OODMetricsCallback
        from ash_lightning.callbacks.interrupt import StopAfterBatchOnCtrlC
        from ash_lightning.cli.yaml_config import use_strict_yaml
        from ash_lightning.data import OODDataModule
        from ash_lightning.deploy.writer import PredictionWriter
        from ash_lightning.module import OODEvalModule

        use_strict_yaml()

        class SaveConfig(main_package_class("cli", "SaveConfigCallback")):  # type: ignore[misc]
            """LightningCLI's ``config.yaml`` writer, the first write to the run folder: a full disk or a folder
            that cannot be written is one UserError naming it."""

            def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
                elsewhere = "point trainer.logger's save_dir at a folder there"
                with write_failures_reported(trainer.log_dir, "config.yaml", elsewhere):  # log_dir: collective
                    super().setup(trainer, pl_module, stage)

        class OODCLI(main_package_class("cli", "LightningCLI")):  # type: ignore[misc]  # of MAIN_PACKAGE
            @staticmethod
            def subcommands() -> dict[str, set[str]]:
                """LightningCLI's commands, or only the one being run: it builds a parser per command it lists,
                about 0.15 s each on 2 cores, at every start of main.py."""
                every: dict[str, set[str]] = main_package_class("cli", "LightningCLI").subcommands()
                return {command: every[command]} if command in every else every

            def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
                parser.add_lightning_class_args(OODMetricsCallback, "ood_metrics")
                parser.set_defaults({"ood_metrics.verbose": False})  # after_test prints the table
                # PredictionWriter's options; LightningCLI names the group of trainer.predict's own ones "predict"
                parser.add_argument("--predict.threshold", type=float | None, help=WRITER_HELP["threshold"])
                parser.add_argument("--predict.from_run", type=str | None, help=WRITER_HELP["from_run"])
                parser.link_arguments("model.backbone", "data.backbone")

            def instantiate_trainer(self, **kwargs: Any) -> Any:
                trainer = super().instantiate_trainer(**kwargs)
                if self.subcommand == "predict":
                    options = self.config["predict"]["predict"]
                    trainer.callbacks.append(PredictionWriter(options["threshold"], options["from_run"]))
                return trainer

            def before_instantiate_classes(self) -> None:
                check_accelerator(self.config[self.subcommand].trainer.accelerator)
                if self.subcommand != "predict":
                    given = [k for k, v in self.config[self.subcommand]["predict"].items() if v is not None]
                    if given:
                        raise UserError(
                            f"--predict.{given[0]} applies to `main.py predict` only, not to `main.py "
                            f"{self.subcommand}`. Fix: remove it, or run main.py predict."
                        )

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

            def after_predict(self) -> None:
                writers = [cb for cb in self.trainer.callbacks if isinstance(cb, PredictionWriter)]
                if self.trainer.is_global_zero and writers and writers[0].summary:
                    print(writers[0].summary)

        OODCLI(
            OODEvalModule,
            OODDataModule,
            args=args,
            save_config_callback=SaveConfig,
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
                **({"predict": {"description": PREDICT_DESCRIPTION}} if "predict" in OODCLI.subcommands() else {}),
            },
        )


PREDICT_DESCRIPTION = """Score new, unlabelled images with one detector setting and flag those that look
out-of-distribution: writes predictions.csv (path or index, score, is_ood, predicted class, max softmax; one row
per sample, in input order) and predictions_summary.json (count, fraction flagged, threshold and its source).

  main.py predict --from_run runs/<name>/version_N --data.predict "{kind: folder, path: images/}"

--from_run <run folder> takes that finished test run's config, its selected setting (or the one
--model.shaping/--model.score name among its settings) and its threshold (at the run's TPR, on val_id when the
run had validation sets, else on its ID test set); the fitted statistics come from the caches or are refitted
on its data.fit. Without --from_run, give a --config and --predict.threshold <t>: a sample scoring below t is
OOD. Files go to <run folder>/predict/version_M (with --from_run) or the logger's directory."""


def from_run_args(args: list[str]) -> list[str]:
    """``main.py predict`` arguments with ``--from_run RUN`` (or ``--from_run=RUN``) replaced by the run's config
    (its setting: the selected one; its logger: ``RUN/predict``) and ``--predict.from_run RUN``; later arguments
    override them. Other arguments are returned as they are."""
    import yaml

    from ash_lightning.deploy.run_folder import run_config, run_results, run_setting

    rest, run_dir = list(args), None
    for i, arg in enumerate(rest):
        if arg == "--from_run" or arg.startswith("--from_run="):
            value = arg.partition("=")[2] if "=" in arg else (rest[i + 1] if i + 1 < len(rest) else "")
            if not value:
                raise UserError("--from_run needs a run folder. Usage: main.py predict --from_run <run folder> ...")
            del rest[i : i + (1 if "=" in arg else 2)]
            run_dir = value
            break
    if run_dir is None:
        return rest
    results = run_results(run_dir)
    config = {k: v for k, v in run_config(run_dir, results).items() if k in PREDICT_CONFIG_KEYS}
    if not (config.get("model") or {}).get("backbone"):
        raise UserError(
            f"{run_dir!r} has no main.py config.yaml naming the network (a run of the callbacks?). Fix: pass "
            "--config <a main.py config with that model> and --predict.threshold, or use load_detector in Python."
        )
    setting = run_setting(results)
    config["model"] = {**config["model"], "shaping": setting.shaping, "score": setting.score, "feature_cache": None}
    logger = {"save_dir": run_dir, "name": "predict", "default_hp_metric": False}
    config["trainer"] = {
        **(config.get("trainer") or {}),
        "logger": {"class_path": f"{MAIN_PACKAGE}.loggers.TensorBoardLogger", "init_args": logger},
    }
    return [*rest[:1], "--config", yaml.safe_dump(config), "--predict.from_run", run_dir, *rest[1:]]


#: The help of ``main.py predict``'s options ``--predict.threshold`` and ``--predict.from_run``.
WRITER_HELP = {
    "threshold": "samples scoring below it are flagged OOD (default: the threshold of --from_run's setting)",
    "from_run": "set by --from_run <run folder>: the run whose threshold applies",
}

#: The keys of a test run's config.yaml that ``main.py predict`` takes (``verbose`` is ``test``'s alone).
PREDICT_CONFIG_KEYS = ("seed_everything", "trainer", "model", "data", "ood_metrics")


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
    debug = debug_requested() or "--debug" in flags
    try:
        if args[:1] == ["report"]:
            report(args[1:])
        elif args[:1] == ["list"]:
            list_specs(args[1:])
        else:
            from ash_lightning.callbacks.brief_errors import show_user_errors_briefly

            if not debug:
                show_user_errors_briefly()  # before Lightning's TensorBoard writer thread starts
            keep_freed_memory_unless_disabled()
            _CLI.run(None if argv is None and args[:1] != ["predict"] else from_run_args(args), next(iter(args), None))
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
