"""The offline demo: the data sets it builds, its shipped config, and a run end to end with a tiny budget."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.datasets import load_digits

from ash_lightning import demo
from tests.conftest import REPO


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return demo.build_datasets(tmp_path_factory.mktemp("demo_data"))


@pytest.fixture
def process_state() -> Iterator[None]:
    """Restore what the demo's ``main`` sets for its whole process: torch's thread count, Lightning's log level."""
    lightning_log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    threads, level = torch.get_num_threads(), lightning_log.level
    yield
    torch.set_num_threads(threads)
    lightning_log.setLevel(level)


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as arrays:
        return {key: arrays[key] for key in arrays.files}


def test_data_sets_have_the_documented_shapes_and_labels(built: dict[str, Path]) -> None:
    sets = {name: _load(path) for name, path in built.items()}
    assert set(sets) == {"train", "test", "digits_5_9", "photos"}
    for arrays in sets.values():
        assert arrays["x"].dtype == np.uint8 and arrays["x"].shape[1:] == (32, 32, 3)
        assert len(arrays["y"]) == len(arrays["x"]) and arrays["y"].dtype == np.int64
    assert set(sets["train"]["y"]) == set(sets["test"]["y"]) == {0, 1, 2, 3, 4}
    assert set(sets["digits_5_9"]["y"]) == {5, 6, 7, 8, 9}
    assert (sets["photos"]["y"] == -1).all() and len(sets["photos"]["x"]) == demo.PHOTO_PATCHES
    assert sets["photos"]["x"].std() > 20  # photo content, not a flat colour


def test_id_split_is_disjoint_complete_and_deterministic(built: dict[str, Path], tmp_path: Path) -> None:
    digits = load_digits()
    train, test, near = (_load(built[name]) for name in ("train", "test", "digits_5_9"))
    assert not set(train["index"]) & set(test["index"])
    assert sorted([*train["index"], *test["index"]]) == list(np.flatnonzero(digits.target < 5))
    assert sorted(near["index"]) == list(np.flatnonzero(digits.target >= 5))
    for arrays in (train, test, near):
        assert (digits.target[arrays["index"]] == arrays["y"]).all()
    assert abs(len(test["y"]) / (len(train["y"]) + len(test["y"])) - demo.HELD_OUT_FRACTION) < 0.01
    again = demo.build_datasets(tmp_path)
    for name, path in built.items():
        assert all((a == b).all() for a, b in zip(_load(path).values(), _load(again[name]).values(), strict=True))


def test_shipped_config_is_the_generated_one() -> None:
    shipped = yaml.safe_load((REPO / "configs" / "demo_digits.yaml").read_text())
    assert shipped == demo.demo_config("$ASH_DEMO_DIR")


def test_unusable_cached_checkpoint_is_retrained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert not demo._usable(tmp_path / "absent.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert not demo._usable(garbage)
    assert "training a new one" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jsonargparse's, from LightningCLI's internals
def test_demo_end_to_end_then_reuses_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], process_state: None
) -> None:
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    assert demo.main(["--cache-dir", str(cache), "--runs-dir", str(runs), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "| **mean** |" in out and f"--logdir {runs / 'demo'}" in out
    last = out.rstrip().splitlines()[-5:]  # the closing lines: logs, report, what to try next
    assert last[0].endswith(f"tensorboard --logdir {runs / 'demo'}")
    assert last[1].endswith(f"main.py report {runs / 'demo' / 'version_0'}")
    assert "configs/demo_digits.yaml" in last[2] and "main.py test --config" in last[3] and "README" in last[4]
    results = json.loads((runs / "demo" / "version_0" / "ood_results.json").read_text())
    assert [run["shaping"] for run in results["runs"]] == demo.SHAPING
    assert all(run["score"] == "energy" for run in results["runs"])
    assert results["ood_sets"] == ["digits_5_9", "photos", "noise"]
    assert results["groups"] == {"near": ["digits_5_9"], "far": ["photos", "noise"]}
    assert results["counts"]["digits_0_4"] == len(_load(cache / demo.FILES["test"])["y"])
    assert (runs / "demo" / "training").is_dir()

    checkpoint = cache / demo.CHECKPOINT
    stamp = checkpoint.stat().st_mtime_ns
    second = demo.run_demo(cache, runs, epochs=1)
    assert not second.trained and checkpoint.stat().st_mtime_ns == stamp
    assert second.results_json == runs / "demo" / "version_1" / "ood_results.json" and second.results_json.is_file()
    assert "Reusing the cached checkpoint" in capsys.readouterr().out
