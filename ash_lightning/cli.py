"""Command line: ``python main.py test --config configs/X.yaml`` (a LightningCLI) and ``main.py report RUN``.

Lightning's tips and accelerator lines are filtered out of the output unless ``--verbose`` is given (see
``quiet_unless_verbose``); ``main.py --help`` lists the commands (``command_help``).

Errors a user can cause (bad path, spec, checkpoint, data, config key or value) end in one message and exit
status 2, also when a DataLoader worker raised them or another exception wraps them (see ``user_error``); set
``ASH_DEBUG=1`` (or pass ``--debug``) to see the full traceback. Anything else propagates with its traceback.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from argparse import ArgumentError

from ash_lightning.allocator import keep_freed_memory_unless_disabled
from ash_lightning.errors import UserError

DEBUG_ENV = "ASH_DEBUG"
VERBOSE_ENV = "ASH_VERBOSE"
_WORKER_ERROR = re.compile(r"Caught (?P<name>\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


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
                                            "init_args": {"save_dir": "runs", "name": "ood",
                                                          "default_hp_metric": False}}},
               parser_kwargs={"description": "Evaluate activation shaping for OOD detection on any timm backbone.",
                              "exit_on_error": False})


def report(path: str) -> None:
    """Recompute and print the metrics table from a run directory or scores.npz, without a model."""
    from ash_lightning.results import format_table, load_scores, results_from_store, write_results

    store, meta = load_scores(path)
    results = results_from_store(store, meta)
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    json_path, _ = write_results(results, directory)
    missing = f"\nNot in the saved scores (the run stopped before them): {', '.join(results['missing'])}" \
        if results["missing"] else ""
    print(format_table(results) + f"\n\nRecomputed from saved scores; written to {json_path}{missing}")


# Lightning's informational lines that a user of this tool cannot act on: the litlogger/litmodels tips, the
# accelerator inventory and the seed line. They are logged (rank_zero_info) to these loggers.
LIGHTNING_CHATTER = re.compile(r"💡 Tip:|(GPU|TPU|HPU|IPU|MPS) available|Seed set to")
LIGHTNING_INFO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                          "lightning_fabric.utilities.seed", "lightning.fabric.utilities.seed")


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

options:
  -h, --help  show this message and exit
  --verbose   keep Lightning's tips and accelerator lines in the output
  --debug     full traceback on errors (same as ASH_DEBUG=1)"""

REPORT_USAGE = """usage: main.py report <run directory | scores.npz>

Recompute and print the metrics table from the scores a `main.py test` run saved (scores.npz in its log
directory), without the model; also after an interrupted run. Writes ood_results.json/.csv next to them."""

TRAINING_COMMANDS = ("fit", "validate")


def command_help(args: list[str]) -> int | None:
    """Answer ``main.py``, ``main.py --help``, ``main.py report --help`` and the training commands ``fit`` and
    ``validate`` (one error line, exit 2: this tool evaluates trained models); the exit status, or None for a
    command line that the commands themselves handle."""
    if not args or args[0] in ("-h", "--help"):
        print(COMMANDS_HELP, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] == "report" and any(a in ("-h", "--help") for a in args[1:]):
        print(REPORT_USAGE)
        return 0
    if args[0] in TRAINING_COMMANDS:
        print(f"error: `main.py {args[0]}` is not available: this tool evaluates trained models (test, predict, "
              "report). Fix: train your model with Lightning (`Trainer.fit(model, datamodule)` or your own "
              "LightningCLI), then evaluate its checkpoint with `main.py test --config ... "
              "--model.checkpoint_path <checkpoint>`.", file=sys.stderr)
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


def user_error(err: BaseException) -> UserError | None:
    """The error a user can fix behind ``err``: ``err`` itself, one a DataLoader worker raised, or the first one in
    its cause/context chain; a config parsing error (unknown key, wrong type) or a missing file becomes one
    naming the fix. None for anything else."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        found = _from_worker(cause)
        if found is not None or isinstance(cause, UserError):
            return found or cause
        if isinstance(cause, FileNotFoundError):
            return UserError(f"{cause}. Fix: check the path.")
        if isinstance(cause, ArgumentError):
            reason = " ".join(str(cause).split()).rstrip(".")
            return UserError(f"invalid configuration: {reason}. Fix: correct the key or value in the config file "
                             "or command line; `python main.py test --help` lists every accepted key and its type.")
        seen.add(id(cause))
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``); returns the exit status (2 for a user error)."""
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
            if len(args) != 2:
                raise UserError("usage: main.py report <run directory | scores.npz>")
            report(args[1])
        else:
            keep_freed_memory_unless_disabled()
            _CLI.run(None if argv is None else args)
    except Exception as err:  # noqa: BLE001 (anything not caused by the user is re-raised below)
        cause = user_error(err)
        if debug or cause is None:
            raise
        print(f"error: {cause}\n(set {DEBUG_ENV}=1 or pass --debug for the traceback)", file=sys.stderr)
        return 2
    return 0
