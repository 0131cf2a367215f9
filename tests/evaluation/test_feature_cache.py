"""Feature cache: a re-run reads each set's shared features (no backbone pass, no images) and writes the same
result files; any change of the key misses; damaged entries are detected and rebuilt; refusals are clear."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from ash_lightning._cache import network_identity
from ash_lightning.callbacks import OODMetricsCallback
from ash_lightning.data import OODDataModule
from ash_lightning.data.datamodule import SetIdentity
from ash_lightning.data.sources import data_identity
from ash_lightning.errors import UserError
from ash_lightning.evaluation.feature_cache import (
    MARKER,
    EntryWriter,
    entry_dir,
    network_key,
    open_feature_cache,
    read_set,
    set_key,
)
from ash_lightning.module import OODEvalModule
from tests.conftest import main_in_process, tiny_config, write_image_folder, write_npz

GRID = ["none", "ash_s@90", "react@1.0"]


class _Batches(pl.Callback):
    """Counts test batches and the image values they carried."""

    def __init__(self) -> None:
        self.batches = self.image_values = 0

    def on_test_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0):
        self.batches += 1
        self.image_values += batch[0].numel()


def _run(
    tiny_data: dict[str, Path], checkpoint: Path, cache: Path | None, out: Path, **model: Any
) -> tuple[int, _Batches]:
    """One in-process test run over the tiny sets; returns (backbone passes, batch counter)."""
    module = OODEvalModule(
        "cifar_resnet20", checkpoint_path=str(checkpoint), shaping=GRID, feature_cache=cache and str(cache), **model
    )
    passes = [0]
    module.model.conv1.register_forward_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    data = OODDataModule(
        id={"kind": "npz", "path": str(tiny_data["id"])},
        ood={n: {"kind": "npz", "path": str(tiny_data[n])} for n in ("dark", "bright")},
        backbone="cifar_resnet20",
        batch_size=32,
    )
    counter = _Batches()
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[OODMetricsCallback(output_dir=str(out), log_figures=False), counter],
    )
    trainer.test(module, datamodule=data, verbose=False)
    return passes[0], counter


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir())


def test_hit_runs_no_backbone_and_loads_no_images(tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    passes, first = _run(tiny_data, tiny_checkpoint, cache, tmp_path / "a")
    assert passes == first.batches == 4 + 3 + 2  # 101, 67, 53 samples in batches of 32
    assert first.image_values > 0 and len(_entries(cache)) == 3
    passes, again = _run(tiny_data, tiny_checkpoint, cache, tmp_path / "b")
    assert passes == 0 and again.batches == first.batches and again.image_values == 0
    changed = tiny_checkpoint.parent / "changed.th"
    state = torch.load(tiny_checkpoint)
    state["state_dict"]["module.conv1.weight"][0, 0, 0, 0] += 1
    torch.save(state, changed)
    passes, _ = _run(tiny_data, changed, cache, tmp_path / "c")  # other weights: a miss
    assert passes == first.batches and len(_entries(cache)) == 6


def _without_cache_option(results: dict) -> dict:
    model = results["config"]["model"]
    model.pop("feature_cache"), model.pop("feature_cache_max_gib")
    return results


def test_result_files_equal_uncached_run(
    tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Calibrated shapers among the settings: fitted on data.fit (their own cache), applied to cached features;
    a covariate-shifted ID set (data.csid) is cached like the others."""
    monkeypatch.setenv("ASH_CACHE_DIR", str(tmp_path / "calibration"))
    shaping = [*GRID, "optfs", "bfact@95@2", "ras"]
    config = lambda out, **model: tiny_config(tiny_data, tiny_checkpoint, out, shaping=shaping, **model)  # noqa: E731
    runs = {
        "uncached": config(tmp_path / "u"),
        "miss": config(tmp_path / "m", feature_cache=str(tmp_path / "cache")),
        "hit": config(tmp_path / "h", feature_cache=str(tmp_path / "cache")),
    }
    shifted = {"kind": "npz", "path": str(write_npz(tmp_path / "shifted.npz", 23, 3, 0.8))}
    for cfg in runs.values():
        cfg["data"]["csid"] = {"shifted": shifted}
        cfg["data"]["fit"] = {"kind": "npz", "path": str(tiny_data["id"]), "limit": 40}
        status, _, err = main_in_process(cfg, tmp_path)
        assert status == 0, err
    assert len(_entries(tmp_path / "cache")) == 4
    folders = {name: tmp_path / name[0] / "run" / "v" for name in runs}
    results = {name: json.loads((f / "ood_results.json").read_text()) for name, f in folders.items()}
    assert results["hit"] == results["miss"]
    assert results["uncached"]["config"]["model"]["feature_cache"] is None
    assert _without_cache_option(results["hit"]) == _without_cache_option(results["uncached"])
    scores = {name: np.load(f / "scores.npz") for name, f in folders.items()}
    assert scores["hit"].files == scores["uncached"].files
    for key in scores["uncached"].files:
        for name in ("miss", "hit"):
            if key == "__meta__":  # the results' metadata as JSON: the same apart from the option
                meta = [json.loads(str(scores[n][key])) for n in (name, "uncached")]
                assert _without_cache_option(meta[0]) == _without_cache_option(meta[1])
            else:
                assert np.array_equal(scores[name][key], scores["uncached"][key]), (name, key)


def test_skipped_corrupt_files_are_recorded_alike_from_the_cache(
    tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path
):
    bad = write_image_folder(tmp_path / "images", 5, 0, truncated=("img001_cut.jpg",))
    results, markers = [], []
    for out in ("m", "h"):
        config = tiny_config(tiny_data, tiny_checkpoint, tmp_path / out, feature_cache=str(tmp_path / "cache"))
        config["data"]["ood"]["folder"] = {"kind": "folder", "path": str(tmp_path / "images")}
        config["data"]["skip_corrupt"] = True
        with warnings.catch_warnings(record=True):
            status, _, err = main_in_process(config, tmp_path)
        assert status == 0, err
        results.append(json.loads((tmp_path / out / "run" / "v" / "ood_results.json").read_text()))
        markers.append({m: m.stat().st_mtime_ns for m in (tmp_path / "cache").glob(f"*/{MARKER}")})
    assert len(markers[0]) == 4 and markers[1] == markers[0]  # all four sets stored, then read, not rewritten
    assert results[0]["skipped"] == {"folder": [str(bad[0])]} and results[1] == results[0]


def _key(model: torch.nn.Module, spec: Any, **change: Any) -> dict:
    parts = {"backbone": "cifar_resnet20", "placement": "penultimate", "precision": "32-true", "device_type": "cpu"}
    parts.update({k: change.pop(k) for k in list(change) if k in parts})
    data = {"transform": {"input_size": (3, 32, 32)}, "skip_corrupt": False, "num_samples": 101} | change
    identity = network_identity(parts["backbone"], model)
    network = network_key(identity, model, parts["placement"], parts["precision"], parts["device_type"])
    identified = {"spec": data_identity(spec), "transform": data["transform"], "skip_corrupt": data["skip_corrupt"]}
    return set_key(network, SetIdentity("id", identified, data["num_samples"]))


def test_every_key_component_changes_the_entry(tiny_data: dict[str, Path], tmp_path: Path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet20")
    spec = {"kind": "npz", "path": str(tiny_data["id"])}
    base = entry_dir(tmp_path, _key(model, spec))
    assert entry_dir(tmp_path, _key(model, dict(spec))) == base  # the same key: the same entry
    other_weights = timm.create_model("cifar_resnet20")
    touched = tmp_path / "id_copy.npz"
    touched.write_bytes(tiny_data["id"].read_bytes())
    changed = {
        "backbone": _key(model, spec, backbone="cifar_resnet32"),
        "weights": _key(other_weights, spec),
        "placement": _key(model, spec, placement="pre_pool"),
        "dtype": _key(timm.create_model("cifar_resnet20").double(), spec),
        "precision": _key(model, spec, precision="bf16-mixed"),
        "device": _key(model, spec, device_type="cuda"),
        "data path": _key(model, {**spec, "path": str(touched)}),
        "data subset": _key(model, {**spec, "limit": 50}),
        "transform": _key(model, spec, transform={"input_size": (3, 64, 64)}),
        "skip_corrupt": _key(model, spec, skip_corrupt=True),
        "num_samples": _key(model, spec, num_samples=100),
    }
    dirs = {name: entry_dir(tmp_path, key) for name, key in changed.items()}
    assert base not in dirs.values() and len(set(dirs.values())) == len(dirs)
    before = entry_dir(tmp_path, _key(model, {**spec, "path": str(touched)}))
    os.utime(touched, ns=(1, 1))  # the same path, replaced in place
    assert entry_dir(tmp_path, _key(model, {**spec, "path": str(touched)})) != before


def _damage(entry: Path, how: str) -> str:
    features = entry / "features.npy"
    if how == "no marker":
        (entry / MARKER).unlink()
        return "partial"
    if how == "truncated":
        features.write_bytes(features.read_bytes()[:-100])
        return "corrupt (features.npy"
    raw = bytearray(features.read_bytes())
    raw[-1] ^= 0xFF
    features.write_bytes(bytes(raw))
    return "checksum differs"


@pytest.mark.parametrize("how", ["no marker", "truncated", "flipped byte"])
def test_damaged_entry_is_reported_and_rebuilt(
    tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path, how: str
):
    cache = tmp_path / "cache"
    _run(tiny_data, tiny_checkpoint, cache, tmp_path / "a")
    damaged = next(e for e in _entries(cache) if json.loads((e / MARKER).read_text())["key"]["num_samples"] == 67)
    expected = _damage(damaged, how)
    with pytest.warns(UserWarning, match=f"feature cache .* {re.escape(expected)}.*rebuilding it") as seen:
        passes, _ = _run(tiny_data, tiny_checkpoint, cache, tmp_path / "b")
    assert len([w for w in seen if "feature cache" in str(w.message)]) == 1
    assert passes == 3  # only the damaged set (67 samples) runs the backbone
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="(?!feature cache)")  # only the cache's own warnings fail
        passes, _ = _run(tiny_data, tiny_checkpoint, cache, tmp_path / "c")
    assert passes == 0


def test_unfit_placement_and_limit_are_refused(tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    status, _, err = main_in_process(
        tiny_config(tiny_data, tiny_checkpoint, tmp_path / "o", placement="layer3", feature_cache=str(cache)), tmp_path
    )
    assert status == 2 and "placement 'layer3'" in err and "no shared features to cache" in err
    (tmp_path / "a_file").write_text("")
    status, _, err = main_in_process(
        tiny_config(tiny_data, tiny_checkpoint, tmp_path / "o", feature_cache=str(tmp_path / "a_file")), tmp_path
    )
    assert status == 2 and "model.feature_cache: output folder" in err and "is a file" in err
    with pytest.raises(UserError, match="feature_cache_max_gib"):
        OODEvalModule("cifar_resnet20", feature_cache=str(cache), feature_cache_max_gib=0)
    with pytest.raises(UserError, match=r"16.0 KiB per sample \(shape \(64, 8, 8\)\).*over the limit") as raised:
        _run(tiny_data, tiny_checkpoint, cache, tmp_path / "a", placement="pre_pool", feature_cache_max_gib=1e-4)
    assert "'id' (101 samples)" in str(raised.value) and not any(cache.iterdir())


def test_incomplete_sets_and_multi_process_runs_are_not_cached(
    tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path
):
    cache = tmp_path / "cache"
    config = tiny_config(tiny_data, tiny_checkpoint, tmp_path / "o", feature_cache=str(cache))
    config["trainer"]["limit_test_batches"] = 2
    with pytest.warns(UserWarning, match="data set 'id' not stored: 32 of its 101 samples were evaluated"):
        status, _, err = main_in_process(config, tmp_path)
    assert status == 0, err
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # no set was evaluated whole: nothing is left
    module = OODEvalModule("cifar_resnet20", feature_cache=str(cache))
    trainer = SimpleNamespace(world_size=2, is_global_zero=True, datamodule=None)
    network = network_identity("cifar_resnet20", module.model)
    with pytest.warns(UserWarning, match="feature_cache is not used: this run has 2 processes"):
        assert open_feature_cache(str(cache), network, module.model, "penultimate", trainer, 8) is None


def test_any_dtype_round_trips_bit_for_bit(tmp_path: Path):
    features = torch.randn(5, 3, 2).to(torch.bfloat16)  # numpy has no bfloat16: rows are stored as raw bytes
    index, targets = torch.tensor([0, 1, -3, 3, 4]), torch.tensor([1, 2, -1, 4, 5])  # position 2: a corrupt file
    key = {"k": 1}
    writer = EntryWriter(tmp_path / "e", key, 5, features.dtype, (3, 2))
    writer.add(features[3:], targets[3:], index[3:])
    assert not writer.complete and read_set(tmp_path / "e", key) is None  # nothing readable before commit
    writer.add(features[:3], targets[:3], index[:3])
    assert writer.complete
    writer.commit()
    got, got_targets, got_index = read_set(tmp_path / "e", key).rows(torch.tensor([4, 2, 0]))
    assert got.dtype == torch.bfloat16 and torch.equal(got, features[[4, 2, 0]])
    assert got_targets.tolist() == [5, -1, 1] and got_index.tolist() == [4, -3, 0]
