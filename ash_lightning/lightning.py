"""ash-lightning for the unified ``lightning`` package (``import lightning as L``): the module and data module as
``lightning.pytorch`` classes, and the callbacks (which either package's Trainer accepts).

    from ash_lightning.lightning import ActivationShapingCallback, OODDataModule, OODEvalModule, OODMetricsCallback

``ash_lightning.module.OODEvalModule`` and ``ash_lightning.data.OODDataModule`` are the same code as
``pytorch_lightning`` classes; see ``ash_lightning.lightning_packages`` for why there are two.
"""

from __future__ import annotations

try:
    import lightning.pytorch as lp
except ImportError as err:
    raise ImportError(
        "ash_lightning.lightning needs the lightning package. Fix: pip install lightning, or use "
        "ash_lightning.module / ash_lightning.data with pytorch_lightning."
    ) from err

from ash_lightning.callbacks import ActivationShapingCallback, OODMetricsCallback
from ash_lightning.data.datamodule import OODDataModuleMixin
from ash_lightning.module import OODEvalModuleMixin

__all__ = ["ActivationShapingCallback", "OODDataModule", "OODEvalModule", "OODMetricsCallback"]


class OODEvalModule(OODEvalModuleMixin, lp.LightningModule):
    __doc__ = OODEvalModuleMixin.__doc__  # LightningCLI's help shows the class docstring


class OODDataModule(OODDataModuleMixin, lp.LightningDataModule):
    __doc__ = OODDataModuleMixin.__doc__
