"""``NetworkCapture``: what the user's network computed on the last batch, read by forward hooks.

A forward hook on the network keeps its output (the logits) of the last call, and one on its classifier keeps
the classifier's input (the penultimate features, after any shaping a pre-hook attached there). Nothing is
computed twice: the hooks keep references to tensors the user's own forward pass made.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ash_lightning.errors import UserError
from ash_lightning.shaping.hooks import find_classifier


class NetworkCapture:
    """Hooks on ``network`` (and its classifier, if it has one) keeping the last call's logits and features;
    ``clear()`` before a batch, ``logits(owner)``/``features`` after it, ``remove()`` at the end."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self.classifier = find_classifier(network)
        self._output: Any = None
        self.features: Tensor | None = None
        self._handles: list[RemovableHandle] = [network.register_forward_hook(self._keep_output)]
        if self.classifier is not None:
            self._handles.append(self.classifier.register_forward_hook(self._keep_features))

    def _keep_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._output = output

    def _keep_features(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.features = args[0] if args and isinstance(args[0], Tensor) else None

    def clear(self) -> None:
        self._output = self.features = None

    @property
    def called(self) -> bool:
        """Whether the network ran since ``clear()``."""
        return self._output is not None

    def logits(self, where: str) -> Tensor:
        """The network's output on the last call, (B, K); a UserError naming the fix when the network did not run
        (``where``: e.g. "test_step") or gave no logits."""
        name = type(self.network).__name__
        if self._output is None:
            raise UserError(
                f"OODMetricsCallback reads the logits from a forward hook on {name}, but {name} did not run in "
                f"{where}. Fix: pass OODMetricsCallback(module=<the attribute of your LightningModule holding the "
                "network that gives the logits>, e.g. module='net')."
            )
        output = self._output
        if not (isinstance(output, Tensor) and output.ndim == 2 and output.is_floating_point()):
            got = f"a tensor of shape {tuple(output.shape)}" if isinstance(output, Tensor) else type(output).__name__
            raise UserError(
                f"OODMetricsCallback reads the logits from {name}'s forward, but it gave {got}, not logits (B, "
                "classes). Fix: pass OODMetricsCallback(module=<the submodule whose forward returns the logits>)."
            )
        return output

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()
