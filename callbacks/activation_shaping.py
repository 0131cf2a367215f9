"""``ActivationShapingCallback``: shape any LightningModule's activations while it tests or predicts."""
from __future__ import annotations

import pytorch_lightning as pl
from torch import nn

from ash_lightning.calibration import calibrate, fit_loader_of, make_cache_key, needs_calibration, weights_fingerprint
from ash_lightning.errors import UserError
from ash_lightning.hooks import ShapingHandle, attach_shaping
from ash_lightning.shaping import get_shaping


class ActivationShapingCallback(pl.Callback):
    """Attach ``spec`` (e.g. ``"ash_s@90"``) at ``placement`` when testing/predicting starts, remove it at the end.

    ``module`` names the network inside the LightningModule (e.g. ``"model"``); by default the first child
    that exposes ``get_classifier()`` (any timm model), else the LightningModule itself. Calibrated specs
    (``react@p90``, ``dice@90``, ``vra@10@90``) are fitted on ``trainer.datamodule.fit_dataloader()`` first,
    cached by the network's weights.
    """

    def __init__(self, spec: str, placement: str = "penultimate", module: str | None = None) -> None:
        try:
            self.shaper = get_shaping(spec)
        except ValueError as err:
            raise UserError(str(err)) from err
        self.spec, self.placement, self.module = self.shaper.spec, placement, module
        self._handle: ShapingHandle | None = None

    def _network(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module is not None:
            try:
                return pl_module.get_submodule(self.module)
            except AttributeError as err:
                children = [n for n, _ in pl_module.named_children()]
                raise UserError(f"ActivationShapingCallback: {type(pl_module).__name__} has no submodule "
                                f"{self.module!r}; its children are {children}.") from err
        candidates = [m for m in (pl_module, *pl_module.children()) if callable(getattr(m, "get_classifier", None))]
        return candidates[0] if candidates else pl_module

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()
        network, shaper = self._network(pl_module), self.shaper
        if needs_calibration(shaper):
            fit = getattr(trainer.datamodule, "hparams", {}).get("fit")
            key = make_cache_key(type(network).__name__, fit=fit, weights=weights_fingerprint(network))
            (shaper,) = calibrate([shaper], network, self.placement, lambda: fit_loader_of(trainer), key,
                                  device=pl_module.device)
        self._handle = attach_shaping(network, shaper, self.placement)

    def _detach(self, *_: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    on_test_start = on_predict_start = _attach
    on_test_end = on_predict_end = on_exception = _detach
