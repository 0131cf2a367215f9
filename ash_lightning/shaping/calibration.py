"""Fit the calibrated shapers (``react@p90``, ``vra@10@90``, ``dice@90``, ``optfs``, ``bfact@95``, ``ras``) on ID
data before testing.

``calibrate(model, spec, loader)`` returns one fitted shaper for ``attach_shaping``; ``calibrate_shapers`` fits
a list of them, with a cache. Either makes one ``FitPass`` over ID fit data (``ash_lightning.data.fit_pass``: eval
mode, ``torch.inference_mode``; tensors, tuples or dicts as batches) and collects what the shapers ask for (see
``ash_lightning.shaping.calibrated``, whose shapers importing this module registers):

* ReAct, VRA: percentiles of the activations at the placement (the tensor the placement shapes, seen before any
  other hook changes it) over all units and samples, by ``np.percentile`` (linear interpolation, as the ReAct
  code, computed in float64). They are exact while the activations hold at most ``MAX_VALUES`` (20M) values.
  Beyond that they are taken over a uniformly random subset of m = ``MAX_VALUES`` // U samples (U values per
  sample, all of them kept, so every unit is seen), drawn with a fixed seed: the same data in the same order gives
  the same subset; at most 2·``MAX_VALUES`` values are held. Bound: the subset's q-th percentile lies between the
  exact (q - ε)-th and (q + ε)-th percentiles with probability at least 1 - 2δ, ε = 100·sqrt(ln(1/δ) / (2m))
  percentage points (Hoeffding on the mean over the kept samples of each one's fraction of values below those
  percentiles, which lies in [0, 1]; sampling without replacement only tightens it). For 512 units, m = 39,062
  and ε = 0.94 points at δ = 1e-3; that is the worst case (samples entirely below or above), and the fraction
  varies much less between samples in practice.
* BFAct: a percentile, as ReAct's threshold.
* DICE: the per-unit mean of the penultimate features h (the input of the classifier).
* RAS: the mean over samples of each sample's activations at the placement sorted ascending (float64, streamed).
* OptFS (placement ``penultimate`` only): from the samples the percentiles keep (all of them up to ``MAX_VALUES``
  values, the same seeded subset beyond) with each one's predicted class (the argmax of the classifier's output),
  the quantiles and the per-bin contributions of ``ash_lightning.shaping.optfs.bin_contributions``.

Before any pass, each calibrated shaper's ``check`` refuses a model or placement it cannot work on (OptFS and
DICE need a linear classifier, OptFS the placement ``penultimate``): ``check_calibration``.

``calibrate_shapers`` caches the statistics as JSON files under ``$ASH_CACHE_DIR`` (default
``~/.cache/ash_lightning/calibration``; ``ash_lightning._cache``), keyed by the fit pass's ``cache_key``
(``make_cache_key``: the network identity, i.e. name and weights fingerprint, and the fit data; no cache without a
key), the placement and ``max_samples``: a repeated run does not touch the fit data. Statistics an entry lacks
(e.g. a new percentile, or RAS's and OptFS's statistics in an entry written before they existed: an entry
without a statistic's field lacks it) are collected and merged in. Writes follow ``ash_lightning._cache``'s rule
(atomic; concurrent runs and DDP ranks may race; a full or read-only folder costs one warning, not the run).
"""

from __future__ import annotations

import functools
import json
import logging
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ash_lightning._cache import StaleEntry, cache_dir, canonical_json, key_digest, read_entry, write_entry
from ash_lightning.data.fit_pass import FitBatch, FitData, FitPass, fit_batches
from ash_lightning.errors import UserError
from ash_lightning.shaping import bfact, optfs, rankfeat, ras  # noqa: F401  (registers them; rankfeat needs no fit)
from ash_lightning.shaping.calibrated import (
    BinContributions,
    IDStats,
    StatsRequest,
    dice_logits,
    dice_mask,
    lts,
    lts_factor,
    missing_fit_data_message,
    needs_calibration,
    unfitted,
    vra,
)
from ash_lightning.shaping.hooks import LogitShaper, activation_tensor, classifier_of, resolve_hook_point
from ash_lightning.shaping.specs import Shaper, get_shaping

__all__ = [
    "IDStats",
    "LogitShaper",
    "MAX_VALUES",
    "StatsRequest",
    "calibrate",
    "calibrate_shapers",
    "check_calibration",
    "collect_stats",
    "dice_logits",
    "dice_mask",
    "lts",
    "lts_factor",
    "make_cache_key",
    "needs_calibration",
    "vra",
]

log = logging.getLogger(__name__)

MAX_VALUES = 20_000_000
_CACHE_FORMAT = 3  # part of every key: bump it when the statistics' definition or the key's layout changes


def make_cache_key(network: dict[str, Any], fit: Any = None, **extra: Any) -> dict[str, Any]:
    """A ``FitPass.cache_key``: the ``network`` (``ash_lightning._cache.network_identity``) and the fit data spec,
    plus ``extra`` entries (e.g. the data transform config); values that are not JSON types count by ``str()``."""
    return {"network": network, "fit": fit, **extra}


def calibrate(
    model: nn.Module,
    spec: str | Shaper,
    loader: FitData,
    placement: str = "penultimate",
    max_samples: int | None = None,
    device: torch.device | None = None,
) -> Shaper:
    """``spec`` (e.g. ``"react@p90"``) fitted on ID statistics of ``model`` at ``placement`` from one pass over
    ``loader`` (a DataLoader or any iterable of batches, or a callable returning one; at most ``max_samples``
    samples), ready for ``attach_shaping(model, shaper, placement)``. A spec without calibration is returned as
    is. Nothing is cached."""
    try:
        shaper = get_shaping(spec)
    except ValueError as err:
        raise UserError(str(err)) from err
    fit = FitPass(lambda: fit_batches(loader), None, max_samples, device)
    return calibrate_shapers([shaper], model, placement, fit)[0]


def calibrate_shapers(shapers: list[Shaper], model: nn.Module, placement: str, fit: FitPass) -> list[Shaper]:
    """``shapers`` with every calibrated one replaced by its version fitted on ID statistics of ``model`` at
    ``placement`` (the others unchanged). The statistics come from the cache or, on a miss, from one ``fit`` pass
    (``collect_stats``). Without ``fit.cache_key`` (data of unknown identity) no cache is read or written."""
    pending = [fn for fn in map(unfitted, shapers) if fn is not None]
    if not pending:
        return list(shapers)
    check_calibration(shapers, model, placement)
    request = functools.reduce(operator.or_, (unfitted.request for unfitted in pending))
    key = {"key": fit.cache_key, "placement": placement, "max_samples": fit.max_samples, "format": _CACHE_FORMAT}
    path = cache_dir() / f"{key_digest(key)}.json" if fit.cache_key else None
    cached = read_entry(path, functools.partial(_read_stats, key=key), "calibration cache") if path else None
    stats = cached if cached is not None else IDStats()
    missing = stats.missing(request)
    if missing:
        log.info("calibration: collecting ID statistics %s at placement %r", missing, placement)
        no_data = missing_fit_data_message([unfitted.spec for unfitted in pending])
        what = ", ".join(unfitted.spec for unfitted in pending)
        stats = stats.merged(collect_stats(model, placement, missing, fit, no_data, what))
        if path:
            entry = canonical_json(_entry(key, stats))
            write_entry(path, lambda tmp: Path(tmp).write_text(entry))
    else:
        log.info("calibration: using cached ID statistics %s", path)
    return [shaper if (fn := unfitted(shaper)) is None else fn.fit(stats, model) for shaper in shapers]


def check_calibration(shapers: list[Shaper], model: nn.Module, placement: str) -> None:
    """A UserError where a calibrated shaper among ``shapers`` cannot work on ``model`` at ``placement``; needs no
    data, so it runs before any pass."""
    for fn in map(unfitted, shapers):
        if fn is not None and fn.check is not None:
            try:
                fn.check(model, placement)
            except ValueError as err:
                raise UserError(str(err)) from err


class _Subsample:
    """The samples added (rows of batch-first tensors, each flattened to its U values), each with its tag when
    given (e.g. its predicted class): all of them while they hold at most ``cap`` values, beyond that a uniformly
    random subset of ``cap // U`` of them (at least one), the ones with the smallest keys drawn from a generator
    seeded with ``seed``; at most 2·``cap`` values are held."""

    def __init__(self, cap: int, seed: int = 0) -> None:
        self.cap, self.generator = cap, torch.Generator().manual_seed(seed)
        self.rows: list[Tensor] = []
        self.keys: list[Tensor] = []
        self.tags: list[Tensor] = []
        self.held = 0

    def add(self, values: Tensor, tags: Tensor | None = None) -> None:
        rows = values.detach().reshape(len(values), -1).float().cpu()
        self.rows.append(rows)
        self.keys.append(torch.rand(len(rows), generator=self.generator))
        if tags is not None:
            self.tags.append(tags.detach().cpu())
        self.held += len(rows)
        if self.held > 2 * self._kept(rows.shape[1]):
            self._shrink()

    def _kept(self, units: int) -> int:
        return max(1, self.cap // units)

    def _shrink(self) -> None:
        """Keep the samples with the ``_kept`` smallest keys."""
        rows, keys = torch.cat(self.rows), torch.cat(self.keys)
        tags = torch.cat(self.tags) if self.tags else None
        kept = self._kept(rows.shape[1])
        if len(rows) > kept:
            chosen = keys.topk(kept, largest=False).indices
            rows, keys, tags = rows[chosen], keys[chosen], None if tags is None else tags[chosen]
        self.rows, self.keys, self.tags, self.held = [rows], [keys], [] if tags is None else [tags], len(rows)

    def values(self) -> Tensor:
        """The kept samples' values, flattened."""
        self._shrink()
        return self.rows[0].flatten()

    def samples(self) -> tuple[Tensor, Tensor]:
        """The kept samples (m, U) and their tags (m,)."""
        self._shrink()
        return self.rows[0], self.tags[0]


class _UnitMean:
    """The running per-unit mean of (B, D) batches, in float64 (as DICE's ``precompute.py``)."""

    def __init__(self) -> None:
        self.total: Tensor | float = 0.0
        self.count = 0

    def add(self, features: Tensor) -> None:
        self.total = self.total + features.detach().flatten(1).sum(0, dtype=torch.float64)
        self.count += features.shape[0]

    def mean(self) -> Tensor:
        return torch.as_tensor(self.total / self.count, dtype=torch.float64).cpu()


@dataclass(frozen=True)
class _Tap:
    """Forward (pre-)hook that stores a copy of the module's first input or of its output under ``name`` in
    ``seen`` (a copy: the network may change the tensor in place later in the pass) and changes nothing."""

    seen: dict[str, Tensor]
    name: str
    placement: str

    def input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.seen[self.name] = args[0].detach().clone()

    def output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.seen[self.name] = activation_tensor(output, module, self.placement).detach().clone()

    def attach(self, module: nn.Module, side: str) -> RemovableHandle:
        """Hook ``module``'s ``side`` ("input" or "output") ahead of its other hooks."""
        if side == "input":
            return module.register_forward_pre_hook(self.input, prepend=True)
        return module.register_forward_hook(self.output, prepend=True)


def collect_stats(
    model: nn.Module,
    placement: str,
    request: StatsRequest,
    fit: FitPass,
    no_data: str = "calibrated shapers need ID fit data: set data.fit, or pass fit_dataloader=<an ID DataLoader>.",
    what: str = "calibrated shapers",
) -> IDStats:
    """``request``'s ID statistics from one ``fit`` pass of ``model`` (eval mode, inference mode; a UserError
    ``no_data`` without fit data; ``what``: the shapers fitted, for its progress); see the module docstring.
    OptFS's need ``placement`` "penultimate"."""
    values, unit_mean, sorted_mean = _Subsample(MAX_VALUES), _UnitMean(), _UnitMean()
    seen: dict[str, Tensor] = {}
    taps = []
    if request.percentiles or request.sorted_mean or request.bin_contributions:
        taps.append((_Tap(seen, "placement", placement), *resolve_hook_point(model, placement)))
    if request.mean:
        taps.append((_Tap(seen, "penultimate", "penultimate"), classifier_of(model), "input"))
    if request.bin_contributions:
        assert placement == "penultimate", "optfs's check refuses other placements before the pass"
        taps.append((_Tap(seen, "logits", "penultimate"), classifier_of(model), "output"))
    hooks = [tap.attach(module, side) for tap, module, side in taps]

    def take(batch: FitBatch) -> None:
        seen.clear()
        model(batch.images)
        if request.percentiles or request.bin_contributions:
            values.add(seen["placement"], seen["logits"].argmax(1) if request.bin_contributions else None)
        if request.mean:
            unit_mean.add(seen["penultimate"])
        if request.sorted_mean:
            sorted_mean.add(seen["placement"].flatten(1).sort(1).values)

    try:
        n_samples = fit.run(model, take, what=what, no_data=no_data)
    finally:
        for hook in hooks:
            hook.remove()
    qs = np.array(sorted(request.percentiles), dtype=np.float64)  # an array of q: interpolated in float64
    found = np.percentile(values.values().numpy(), qs) if len(qs) else []
    contributions = None
    if request.bin_contributions:
        features, preds = values.samples()
        weight = classifier_of(model).weight
        assert isinstance(weight, Tensor), "optfs's check requires a linear classifier before the pass"
        contributions = optfs.bin_contributions(features, preds, weight)
    return IDStats(
        {q: float(v) for q, v in zip(qs, found, strict=True)},
        unit_mean.mean() if request.mean else None,
        n_samples,
        sorted_mean.mean() if request.sorted_mean else None,
        contributions,
    )


def _read_stats(path: Path, key: dict[str, Any]) -> IDStats:
    """The statistics of the calibration cache entry for ``key`` at ``path`` (a field an older entry lacks reads
    as not collected)."""
    entry = json.loads(path.read_text())
    if entry["key"] != json.loads(canonical_json(key)):
        raise StaleEntry("holds another key")
    vector = lambda name: None if entry.get(name) is None else torch.tensor(entry[name], dtype=torch.float64)  # noqa: E731
    bins = entry.get("bin_contributions")
    return IDStats(
        {float(q): float(v) for q, v in entry["percentiles"]},
        vector("mean"),
        int(entry["n_samples"]),
        vector("sorted_mean"),
        None if bins is None else BinContributions(float(bins["low"]), float(bins["high"]), tuple(bins["values"])),
    )


def _entry(key: dict[str, Any], stats: IDStats) -> dict[str, Any]:
    """The calibration cache entry of ``stats`` under ``key``."""
    bins = stats.bin_contributions
    return {
        "key": key,
        "n_samples": stats.n_samples,
        "percentiles": sorted(stats.percentiles.items()),
        "mean": None if stats.mean is None else stats.mean.tolist(),
        "sorted_mean": None if stats.sorted_mean is None else stats.sorted_mean.tolist(),
        "bin_contributions": None if bins is None else {"low": bins.low, "high": bins.high, "values": bins.values},
    }
