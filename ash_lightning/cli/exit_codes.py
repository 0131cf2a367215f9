"""From an exception to what ``main.py`` prints and its exit status: 2 and one ``error:`` line for an error a user
can fix (also when a DataLoader worker raised it or another exception wraps it), 130 for Ctrl+C (SIGINT) and 143
for SIGTERM (the shells' 128 + signal number); anything else propagates with its traceback."""

from __future__ import annotations

import os
import re
import signal
from argparse import ArgumentError

from ash_lightning.errors import DISK_ERRORS, UserError, exception_chain, write_failure
from ash_lightning.lightning_packages import main_package_class

USER_ERROR = 2
_WORKER_ERROR = re.compile(r"Caught (?P<name>\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


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
    """The error a user can fix behind ``err``: the first UserError in its cause/context chain (also one a
    DataLoader worker raised); else a config parsing error (unknown key, wrong type), a Lightning
    misconfiguration (e.g. ``accelerator: gpu`` without a GPU) or a write that a full disk, a quota or a read-only
    file system stopped (``DISK_ERRORS``, e.g. Lightning's ``config.yaml``) becomes one naming the fix. None for
    anything else, which is a bug to report with its traceback."""
    misconfiguration = main_package_class("utilities.exceptions", "MisconfigurationException")
    chain = exception_chain(err)
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
        if isinstance(cause, misconfiguration):
            return UserError(
                f"invalid trainer setting: {reason}. Fix: change the trainer option it names in the "
                "config (`python main.py test --help` lists them)."
            )
        if isinstance(cause, OSError) and cause.errno in DISK_ERRORS:
            name = os.fspath(cause.filename) if isinstance(cause.filename, str | os.PathLike) else None
            return write_failure(
                cause,
                os.path.dirname(os.path.abspath(name)) if name else None,
                repr(os.path.basename(name)) if name else "a file",
                "point trainer.logger's save_dir and ood_metrics.output_dir at a folder there",
            )
    return None


def stopping_signal(stop: KeyboardInterrupt | SystemExit) -> signal.Signals | None:
    """The signal behind ``stop``: SIGTERM for Lightning's ``SIGTERMException`` (it stops the loop after the batch
    in flight), SIGINT for Ctrl+C (a KeyboardInterrupt, or the ``sys.exit(1)`` Lightning raises after handling
    one); None for any other exit."""
    if isinstance(stop, KeyboardInterrupt) or isinstance(stop.__context__, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(stop, main_package_class("utilities.exceptions", "SIGTERMException")):
        return signal.SIGTERM
    return None
