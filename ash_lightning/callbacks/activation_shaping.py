"""``ActivationShapingCallback``: shape any LightningModule's activations while it tests or predicts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ash_lightning._cache import network_identity
from ash_lightning.callbacks.network import find_network
from ash_lightning.data.fit_pass import FitData, FitPass, fit_batches, fit_loader_of
from ash_lightning.errors import UserError
from ash_lightning.lightning_packages import CALLBACK_BASES
from ash_lightning.shaping.calibration import calibrate_shapers, make_cache_key, needs_calibration
from ash_lightning.shaping.hooks import ShapingHandle, attach_shaping
from ash_lightning.shaping.specs import get_shaping


class ActivationShapingCallback(*CALLBACK_BASES):  # type: ignore[misc]  # the Callback of every installed package
    """Attach ``spec`` (e.g. ``"ash_s@90"``) at ``placement`` when testing/predicting starts, remove it at the end.

    ``module`` names the network inside the LightningModule (e.g. ``"model"``). By default it is the first child
    (attribute) of the LightningModule that is an ``nn.Module`` with a classifier (timm's ``get_classifier()``,
    or an ``nn.Linear`` inside it: torchvision models), else the LightningModule itself.

    Calibrated specs (``react@p90``, ``dice@90``, ``vra@10@90``, ``lts@90``) are fitted first on ID data:
    ``fit_dataloader`` (a DataLoader, or a callable returning one), else the data module's ``fit_dataloader()``
    (``OODDataModule`` with ``data.fit``, whose statistics are cached by the network's weights).

    Example:
        >>> import torch
        >>> import pytorch_lightning as pl
        >>> from torch.utils.data import DataLoader
        >>> from ash_lightning.callbacks import ActivationShapingCallback
        >>> class Classifier(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        ...     def predict_step(self, batch, batch_idx):
        ...         return self.net(batch)
        >>> shaping = ActivationShapingCallback("ash_s@90")  # at "penultimate": the input of net[2]
        >>> trainer = pl.Trainer(logger=False, callbacks=[shaping], enable_progress_bar=False)
        >>> module, x = Classifier(), torch.rand(8, 4)
        >>> (logits,) = trainer.predict(module, DataLoader(x, batch_size=8))
        >>> from ash_lightning import ash_s
        >>> torch.allclose(logits, module.net[2](ash_s(module.net[1](module.net[0](x)), 90)), atol=1e-5)
        True
        >>> torch.allclose(module.net(x), logits)  # detached again when predicting ends
        False
    """

    def __init__(
        self,
        spec: str,
        placement: str = "penultimate",
        module: str | None = None,
        fit_dataloader: FitData | None = None,
    ) -> None:
        try:
            self.shaper = get_shaping(spec)
        except ValueError as err:
            raise UserError(str(err)) from err
        self.spec, self.placement, self.module = self.shaper.spec, placement, module
        self.fit_dataloader = fit_dataloader
        self._handle: ShapingHandle | None = None

    def _fit_loader(self, trainer: Any) -> Iterable[Any]:
        """The ID fit data: ``fit_dataloader``, else the data module's; a UserError naming both ways if neither."""
        if self.fit_dataloader is not None:
            return fit_batches(self.fit_dataloader)
        loader = fit_loader_of(trainer)
        if loader is None:
            raise UserError(
                f"{self.spec} needs ID statistics, and the trainer has no ID fit data for it. Fix: pass "
                f"ActivationShapingCallback({self.spec!r}, fit_dataloader=<an ID DataLoader, or a "
                "callable returning one>), or fit it yourself with ash_lightning.shaping.calibration.calibrate("
                f"model, {self.spec!r}, loader) and attach the result with attach_shaping."
            )
        return loader

    def _attach(self, trainer: Any, pl_module: Any) -> None:  # either Lightning package's Trainer and module
        self._detach()
        network, shaper = find_network(pl_module, self.module, "ActivationShapingCallback"), self.shaper
        if needs_calibration(shaper):
            fit = getattr(trainer.datamodule, "hparams", {}).get("fit") if self.fit_dataloader is None else None
            key = make_cache_key(network_identity(type(network).__name__, network), fit) if fit is not None else None
            fit_pass = FitPass(lambda: self._fit_loader(trainer), key, device=pl_module.device)
            (shaper,) = calibrate_shapers([shaper], network, self.placement, fit_pass)
        self._handle = attach_shaping(network, shaper, self.placement)

    def _detach(self, *_: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    on_test_start = on_predict_start = _attach
    on_test_end = on_predict_end = on_exception = _detach
