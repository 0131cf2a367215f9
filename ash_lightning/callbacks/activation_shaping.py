"""``ActivationShapingCallback``: shape any LightningModule's activations while it tests or predicts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from ash_lightning._cache import network_identity
from ash_lightning.callbacks.brief_errors import show_user_errors_briefly
from ash_lightning.callbacks.fit_data import fit_data_name, id_fit_data
from ash_lightning.callbacks.network import find_network
from ash_lightning.callbacks.scoring import Settings
from ash_lightning.data.fit_pass import FitData, FitPass, stop_on_signal
from ash_lightning.data.progress import trainer_progress
from ash_lightning.errors import UserError
from ash_lightning.lightning_packages import CALLBACK_BASES, rank_zero_info
from ash_lightning.shaping.calibration import calibrate_shapers, make_cache_key, needs_calibration
from ash_lightning.shaping.hooks import ShapingHandle, StageShaper, attach_shaping, last_stage
from ash_lightning.shaping.specs import Shaper, get_shaping

if TYPE_CHECKING:
    from ash_lightning.callbacks.types import LightningModule, Trainer


class ActivationShapingCallback(*CALLBACK_BASES):  # type: ignore[misc]  # the Callback of every installed package
    """Attach ``spec`` (e.g. ``"ash_s@90"``) at ``placement`` when testing/predicting starts, remove it at the end.

    A list of specs (``["none", "ash_s@90", "react@p90"]``) is a sweep: nothing is attached while the user's
    ``test_step`` runs, and ``OODMetricsCallback`` evaluates every setting from that one backbone pass per batch,
    ranked in one table (see ``ash_lightning.callbacks.scoring``).

    ``module`` names the network inside the LightningModule (e.g. ``"model"``). By default it is the first child
    (attribute) of the LightningModule that is an ``nn.Module`` with a classifier (timm's ``get_classifier()``,
    or an ``nn.Linear`` inside it: torchvision models), else the LightningModule itself.

    ``rankfeat`` shapes the network's last two ResNet stages whatever ``placement`` says
    (``ash_lightning.shaping.rankfeat``); a network without them is refused when testing starts.

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
        spec: str | Sequence[str],
        placement: str = "penultimate",
        module: str | None = None,
        fit_dataloader: FitData | None = None,
    ) -> None:
        specs = [spec] if isinstance(spec, str) else [str(one) for one in spec]
        try:
            self.requested = [get_shaping(one) for one in specs]
        except ValueError as err:
            raise UserError(f"ActivationShapingCallback: {err}") from err
        self.specs = [shaper.spec for shaper in self.requested]
        if not self.specs:
            raise UserError("ActivationShapingCallback([]) lists no shaping. Fix: e.g. ['none', 'ash_s@90'].")
        repeated = next((one for i, one in enumerate(self.specs) if one in self.specs[:i]), None)
        if repeated is not None:
            raise UserError(
                f"ActivationShapingCallback lists {repeated!r} twice (as written, or the same setting written two "
                "ways). Fix: remove the repeat."
            )
        self.spec, self.placement, self.module = ", ".join(self.specs), placement, module
        self.fit_dataloader = fit_dataloader
        self.shapers: list[Shaper] = list(self.requested)  # calibrated ones are fitted when testing starts
        self._handle: ShapingHandle | None = None

    @property
    def sweep(self) -> bool:
        """Several settings: none is attached while the user's loop runs; ``OODMetricsCallback`` evaluates each."""
        return len(self.specs) > 1

    def settings(self) -> Settings:
        """The settings ``OODMetricsCallback`` evaluates: the attached one, or every one of a sweep."""
        return Settings(self.specs, self.shapers if self.sweep else None, self.placement)

    def _fit_data(self, trainer: Trainer) -> Iterable[Any]:
        spec = self.specs[0] if not self.sweep else self.specs
        return id_fit_data(
            self.fit_dataloader,
            trainer,
            ", ".join(shaper.spec for shaper in self.requested if needs_calibration(shaper)),
            f"pass ActivationShapingCallback({spec!r}, fit_dataloader=<an ID DataLoader, or a callable returning "
            "one>), or fit it yourself with ash_lightning.shaping.calibration.calibrate(model, spec, loader) and "
            "attach the result with attach_shaping.",
        )

    def _calibrate(self, trainer: Trainer, pl_module: LightningModule) -> nn.Module:
        """The network, with ``shapers`` fitted on the ID fit data where they need it."""
        network = find_network(pl_module, self.module, "ActivationShapingCallback")
        for shaper in self.requested:
            if isinstance(shaper, StageShaper):
                try:
                    last_stage(network, shaper.spec)
                except ValueError as err:
                    raise UserError(f"ActivationShapingCallback: {err}") from err
        if any(map(needs_calibration, self.requested)):
            fit = getattr(trainer.datamodule, "hparams", {}).get("fit") if self.fit_dataloader is None else None
            key = make_cache_key(network_identity(type(network).__name__, network), fit) if fit is not None else None
            fit_pass = FitPass(
                lambda: self._fit_data(trainer),
                key,
                device=pl_module.device,
                data_name=fit_data_name(self.fit_dataloader, trainer),
                progress=trainer_progress(trainer),
                stop=stop_on_signal(trainer),
            )
            self.shapers = calibrate_shapers(self.requested, network, self.placement, fit_pass)
        return network

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        show_user_errors_briefly()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._detach()
        network = self._calibrate(trainer, pl_module)
        if self.sweep:
            rank_zero_info(
                f"ActivationShapingCallback: a sweep of {len(self.specs)} settings; your own test_step runs the "
                "network unshaped (its logged metrics are those of your model as trained), and OODMetricsCallback "
                "evaluates every setting from the same pass."
            )
            return
        self._handle = attach_shaping(network, self.shapers[0], self.placement)
        rank_zero_info(
            f"ActivationShapingCallback: {self.spec} is attached to {type(network).__name__} while testing, so the "
            "metrics your test_step logs are those of the shaped network."
        )

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._detach()
        if self.sweep:
            raise UserError(
                f"ActivationShapingCallback({self.specs}) is a sweep; predicting runs one setting. Fix: give one "
                "spec, e.g. ActivationShapingCallback('ash_s@90'), to predict."
            )
        self._handle = attach_shaping(self._calibrate(trainer, pl_module), self.shapers[0], self.placement)

    def _detach(self, *_: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    on_test_end = on_predict_end = on_exception = _detach
