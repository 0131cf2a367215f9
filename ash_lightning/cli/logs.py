"""Lightning's informational lines a user of this tool cannot act on are filtered out of the output, unless
``--verbose`` is given (``ASH_VERBOSE=1``, which DDP workers inherit)."""

from __future__ import annotations

import logging
import os
import re
import warnings

from ash_lightning.lightning_packages import INFO_LOGGERS

VERBOSE_ENV = "ASH_VERBOSE"

# The litlogger/litmodels tips, the accelerator inventory and the seed line, logged to ``INFO_LOGGERS``.
LIGHTNING_CHATTER = re.compile(r"💡 Tip:|(GPU|TPU|HPU|IPU|MPS) available|Seed set to")


class _DropChatter(logging.Filter):
    """Drops the log records whose message matches ``LIGHTNING_CHATTER``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return LIGHTNING_CHATTER.search(record.getMessage()) is None


def quiet_unless_verbose(verbose: bool) -> None:
    """With ``verbose``, set ``ASH_VERBOSE=1`` (DDP workers re-run the command line without the flag and inherit
    it). Without it (nor ``ASH_VERBOSE=1``), Lightning's tips and accelerator lines are filtered out of its
    loggers, and torch's deprecation of ``LeafSpec`` (raised inside Lightning, not by the user's code) is
    ignored; else the filters are removed."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    quiet = os.environ.get(VERBOSE_ENV, "") in ("", "0")
    for name in INFO_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _DropChatter)]:
            logger.removeFilter(old)
        if quiet:
            logger.addFilter(_DropChatter())
    if quiet:
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
