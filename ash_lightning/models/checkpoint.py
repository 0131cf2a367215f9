"""Loading a local checkpoint into a backbone, with errors that say what does not fit and how to fix it."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ash_lightning._files import check_path, expand_set_vars
from ash_lightning.errors import UserError

_NESTING_KEYS = ("state_dict", "model", "model_state_dict", "net")
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "net.", "_orig_mod.")
_LISTED = 8


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a bare state_dict, or one nested under ``state_dict``/``model``, from a ``torch.save`` file."""
    path = expand_set_vars(path, "model.checkpoint_path")
    check_path(
        path,
        "file",
        "checkpoint",
        "point checkpoint_path at an existing file (environment variables such as $DATASETS are expanded)",
    )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (unpickling arbitrary bytes fails with any type: KeyError, EOFError...)
        if "weights only" in str(err).lower():  # torch's message goes on to suggest unpickling it unsafely
            reason = "it holds Python objects besides tensors, which are never unpickled (that can run any code)"
        else:
            reason = str(err).strip().split("\n")[0]
            reason = f"{err.__class__.__name__}: {reason if len(reason) <= 200 else reason[:200] + '...'}"
        raise UserError(
            f"could not read checkpoint {path!r} ({reason}). "
            "Fix: it must be a file written by torch.save (a state_dict or a Lightning "
            ".ckpt); re-download it if it is truncated or unreadable."
        ) from err
    for key in _NESTING_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(
            f"checkpoint {path!r} holds no state_dict (found {type(obj).__name__}). Fix: save "
            "model.state_dict(), or a dict with it under 'state_dict' or 'model'."
        )
    return dict(obj)


def strip_wrapper_prefix(state_dict: Mapping[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """Remove DataParallel/Lightning prefixes (``module.``, ``model.``, ...) shared by every key."""
    sd = dict(state_dict)
    for prefix in _WRAPPER_PREFIXES:
        if not expected.intersection(sd) and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else "")


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load ``path`` into ``model``; with ``strict`` every key and shape must match, else a UserError lists them."""
    own = model.state_dict()
    sd = strip_wrapper_prefix(read_state_dict(path), set(own))
    missing = sorted(k for k in set(own) - set(sd) if not k.endswith("num_batches_tracked"))  # BN defaults it
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(
        f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(sd) & set(own)
        if sd[k].shape != own[k].shape
    )
    if mismatched or (strict and (missing or unexpected)):
        problems = [
            f"{label} ({len(keys)}): {_listing(keys)}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if keys
        ]
        raise UserError(
            f"checkpoint {str(path)!r} does not fit {model.__class__.__name__}: "
            + "; ".join(problems)
            + ". Fix: check `backbone` and `num_classes` against the "
            "checkpoint, or set strict_loading: false to load the keys that fit."
        )
    model.load_state_dict(sd, strict=strict)
    return model
