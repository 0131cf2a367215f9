"""The command line (``main.py``): a LightningCLI for ``test``/``predict`` plus ``report`` and ``list``."""

from ash_lightning.cli.app import main

__all__ = ["main"]
