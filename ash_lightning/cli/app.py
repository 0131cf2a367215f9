"""Command line: ``python main.py test --config configs/X.yaml`` (a LightningCLI) and ``main.py report RUN``.

Lightning's tips and accelerator lines are filtered out of the output unless ``--verbose`` is given (see
``quiet_unless_verbose``); ``main.py --help`` lists the commands (``command_help``).

Errors a user can cause (bad path, spec, checkpoint, data, config key or value) end in one message and exit
status 2, also when a DataLoader worker raised them or another exception wraps them (see ``user_error``); set
``ASH_DEBUG=1`` (or pass ``--debug``) to see the full traceback. Anything else propagates with its traceback.
A run stopped by SIGTERM or Ctrl+C keeps the data sets it finished and exits 143 or 130 (128 + the signal).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Sequence
from typing import Any, NoReturn

from ash_lightning._files import writable_directory
from ash_lightning.cli.allocator import keep_freed_memory_unless_disabled
from ash_lightning.errors import UserError

DEBUG_ENV = "ASH_DEBUG"
VERBOSE_ENV = "ASH_VERBOSE"
_WORKER_ERROR = re.compile(r"Caught (?P<name>\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


class _CLI:
    """The LightningCLI subclass, built lazily so ``report`` and ``--help`` of it stay light."""

    @staticmethod
    def run(args: list[str] | None) -> None:
        from pytorch_lightning.cli import LightningCLI

        from ash_lightning.callbacks import OODMetricsCallback
        from ash_lightning.callbacks.interrupt import StopAfterBatchOnCtrlC
        from ash_lightning.cli.yaml_config import use_strict_yaml
        from ash_lightning.data import OODDataModule
        from ash_lightning.module import OODEvalModule

        use_strict_yaml()

        class OODCLI(LightningCLI):
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
                # Trainer.callbacks is set by Lightning's callback connector, outside the class mypy reads
                callbacks = self.trainer.callbacks  # type: ignore[attr-defined]
                metrics = [cb for cb in callbacks if isinstance(cb, OODMetricsCallback)]
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
                    "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
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
    from pytorch_lightning.accelerators import AcceleratorRegistry

    if not isinstance(accelerator, str):
        return
    kinds = {"gpu": ("cuda", "mps")}.get(accelerator, (accelerator,))
    if all(k in AcceleratorRegistry for k in kinds) and not any(
        AcceleratorRegistry[k]["accelerator"].is_available() for k in kinds
    ):
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


class _ReportParser(argparse.ArgumentParser):
    """``main.py report`` arguments; a usage mistake is a UserError (one ``error:`` line, exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}. Usage: {self.format_usage().strip().removeprefix('usage: ')}")


def report(args: list[str]) -> None:
    """Recompute and print the metrics table from a run directory or scores.npz, without a model; ``--tpr`` and
    ``--convention`` override the values the run used."""
    from ash_lightning._options import check_choice, check_range
    from ash_lightning.evaluation.metrics import CONVENTIONS
    from ash_lightning.evaluation.results import format_table, results_from_store, write_results
    from ash_lightning.evaluation.score_store import load_scores

    parser = _ReportParser(prog="main.py report", add_help=False)
    parser.add_argument("path", help="a run directory or its scores.npz")
    parser.add_argument("--tpr", type=float, help="TPR of the FPR metric, in (0, 1]")
    parser.add_argument("--convention", help=f"one of {CONVENTIONS}")
    opts = parser.parse_args(args)
    if opts.tpr is not None:
        check_range("--tpr", opts.tpr, 0, 1, low_open=True, high_open=False, example=0.95)
    if opts.convention is not None:
        check_choice("--convention", opts.convention, CONVENTIONS)
    store, meta = load_scores(opts.path)
    results = results_from_store(store, meta, tpr=opts.tpr, convention=opts.convention)
    path = opts.path
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    json_path, _ = write_results(results, directory)
    missing = (
        f"\nNot in the saved scores (the run stopped before them): {', '.join(results['missing'])}"
        if results["missing"]
        else ""
    )
    print(format_table(results) + f"\n\nRecomputed from saved scores; written to {json_path}{missing}")


LIST_USAGE = """usage: main.py list

Print every spec form main.py and the callbacks accept, with a one-line description: shapings (model.shaping,
ActivationShapingCallback), scores (model.score, ood_metrics.score) and detectors (model.shaping)."""


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


# Lightning's informational lines that a user of this tool cannot act on: the litlogger/litmodels tips, the
# accelerator inventory and the seed line. They are logged (rank_zero_info) to these loggers.
LIGHTNING_CHATTER = re.compile(r"💡 Tip:|(GPU|TPU|HPU|IPU|MPS) available|Seed set to")
LIGHTNING_INFO_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning_fabric.utilities.seed",
    "lightning.fabric.utilities.seed",
)


class _DropChatter(logging.Filter):
    """Drops the log records whose message matches ``LIGHTNING_CHATTER``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return LIGHTNING_CHATTER.search(record.getMessage()) is None


def quiet_unless_verbose(args: list[str]) -> list[str]:
    """``args`` without ``--verbose``. Without it (nor ``ASH_VERBOSE=1``, which passes it on to DDP workers),
    Lightning's tips and accelerator lines are filtered out of its loggers, and torch's deprecation of
    ``LeafSpec`` (raised inside Lightning, not by the user's code) is ignored."""
    if "--verbose" in args:
        os.environ[VERBOSE_ENV] = "1"
        sys.argv = [a for a in sys.argv if a != "--verbose"]  # DDP launchers re-run sys.argv
        args = [a for a in args if a != "--verbose"]
    quiet = os.environ.get(VERBOSE_ENV, "") in ("", "0")
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _DropChatter)]:
            logger.removeFilter(old)
        if quiet:
            logger.addFilter(_DropChatter())
    if quiet:
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    return args


COMMANDS_HELP = """usage: main.py <command> [options]    (main.py <command> --help lists a command's options)

Evaluate activation shaping for OOD detection on any timm backbone, with a trained model.

commands:
  test      OOD metrics per data set of a config: main.py test --config configs/X.yaml
  predict   per-sample logits and OOD scores of a config's test data, without metrics
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


def _user_error_names() -> set[str]:
    """Class names of UserError and all its subclasses."""
    names, todo = set(), [UserError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


def _from_worker(err: BaseException) -> UserError | None:
    """The UserError a DataLoader worker raised: PyTorch re-raises it in the main process with the worker's
    formatted traceback as its message ("Caught X in DataLoader worker process N. Original Traceback ...
    module.X: message"), as X itself or, when X cannot be rebuilt from that text, as a RuntimeError."""
    match = _WORKER_ERROR.match(str(err))
    if match is None or match["name"] not in _user_error_names():
        return None
    return UserError(str(err).rsplit(f"{match['name']}: ", 1)[-1].strip())


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and its cause/context chain, outermost first."""
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and all(cause is not seen for seen in chain):
        chain.append(cause)
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return chain


def user_error(err: BaseException) -> UserError | None:
    """The error a user can fix behind ``err``: the first UserError in its cause/context chain (also one a
    DataLoader worker raised); else a config parsing error (unknown key, wrong type) or a Lightning
    misconfiguration (e.g. ``accelerator: gpu`` without a GPU) becomes one naming the fix. None for anything else,
    which is a bug to report with its traceback."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    chain = _chain(err)
    for cause in chain:
        found = _from_worker(cause)
        if found is not None:
            return found
        if isinstance(cause, UserError):
            return cause
    for cause in chain:
        reason = " ".join(str(cause).split()).rstrip(".")
        if isinstance(cause, ArgumentError):
            return UserError(
                f"invalid configuration: {reason}. Fix: correct the key or value in the config file "
                "or command line; `python main.py test --help` lists every accepted key and its type."
            )
        if isinstance(cause, MisconfigurationException):
            return UserError(
                f"invalid trainer setting: {reason}. Fix: change the trainer option it names in the "
                "config (`python main.py test --help` lists them)."
            )
    return None


def _stopping_signal(stop: KeyboardInterrupt | SystemExit) -> signal.Signals | None:
    """The signal behind ``stop``: SIGTERM for Lightning's ``SIGTERMException`` (it stops the loop after the batch
    in flight), SIGINT for Ctrl+C (a KeyboardInterrupt, or the ``sys.exit(1)`` Lightning raises after handling
    one); None for any other exit."""
    if isinstance(stop, KeyboardInterrupt) or isinstance(stop.__context__, KeyboardInterrupt):
        return signal.SIGINT
    if "pytorch_lightning" in sys.modules:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if isinstance(stop, SIGTERMException):
            return signal.SIGTERM
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``); returns the exit status: 2 for a user error, 130 for
    Ctrl+C (SIGINT) and 143 for SIGTERM, the shells' 128 + signal number, after the finished sets were saved."""
    args = quiet_unless_verbose(list(sys.argv[1:] if argv is None else argv))
    status = command_help(args)
    if status is not None:
        return status
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in args
    if "--debug" in args:
        sys.argv = [a for a in sys.argv if a != "--debug"]  # DDP launchers re-run sys.argv
        args.remove("--debug")
    try:
        if args[:1] == ["report"]:
            report(args[1:])
        elif args[:1] == ["list"]:
            list_specs(args[1:])
        else:
            keep_freed_memory_unless_disabled()
            _CLI.run(None if argv is None else args)
    except (KeyboardInterrupt, SystemExit) as stop:
        signum = _stopping_signal(stop)
        if signum is None:
            raise
        print(f"error: stopped by {signum.name} before every data set was evaluated", file=sys.stderr)
        return 128 + signum
    except Exception as err:  # noqa: BLE001 (anything not caused by the user is re-raised below)
        cause = user_error(err)
        if debug or cause is None:
            raise
        print(f"error: {cause}\n(set {DEBUG_ENV}=1 or pass --debug for the traceback)", file=sys.stderr)
        return 2
    return 0
