"""Command line: ``python main.py test --config configs/X.yaml`` (a LightningCLI) and ``main.py report RUN``.

Errors a user can cause (bad path, spec, checkpoint, data, config key or value) end in one message and exit
status 2, also when a DataLoader worker raised them or another exception wraps them (see ``user_error``); set
``ASH_DEBUG=1`` (or pass ``--debug``) to see the full traceback. Anything else propagates with its traceback.
"""
from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError

from ash_lightning.allocator import keep_freed_memory_unless_disabled
from ash_lightning.errors import UserError

DEBUG_ENV = "ASH_DEBUG"
_WORKER_ERROR = re.compile(r"Caught (?P<name>\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


class _CLI:
    """The LightningCLI subclass, built lazily so ``report`` and ``--help`` of it stay light."""

    @staticmethod
    def run(args: list[str] | None) -> None:
        from pytorch_lightning.cli import LightningCLI

        from ash_lightning.data import OODDataModule
        from ash_lightning.module import OODEvalModule
        from ash_lightning.callbacks import OODMetricsCallback

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
            keep_freed_memory_unless_disabled()
            _CLI.run(None if argv is None else args)
    except Exception as err:  # noqa: BLE001 (anything not caused by the user is re-raised below)
        cause = user_error(err)
        if debug or cause is None:
            raise
        print(f"error: {cause}\n(set {DEBUG_ENV}=1 or pass --debug for the traceback)", file=sys.stderr)
        return 2
    return 0
