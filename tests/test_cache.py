"""ash_lightning._cache: canonical JSON, key digests, the network identity, and entries read or rebuilt."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ash_lightning._cache import (
    StaleEntry,
    cache_dir,
    canonical_json,
    key_digest,
    network_identity,
    read_entry,
    weights_fingerprint,
    write_entry,
)


def test_canonical_json_sorts_keys_and_writes_other_values_as_text() -> None:
    key = {"b": (1, 2), "a": {"z": None, "y": Path("/data/fit.npz")}}
    assert canonical_json(key) == '{"a": {"y": "/data/fit.npz", "z": null}, "b": [1, 2]}'
    assert canonical_json(dict(reversed(list(key.items())))) == canonical_json(key)


def test_key_digest_is_the_sha256_of_the_canonical_json_and_ignores_order() -> None:
    key = {"placement": "penultimate", "max_samples": None, "format": 3}
    expected = hashlib.sha256(b'{"format": 3, "max_samples": null, "placement": "penultimate"}').hexdigest()[:32]
    assert key_digest(key) == expected == key_digest(dict(sorted(key.items(), reverse=True)))
    assert key_digest({**key, "max_samples": 10}) != expected


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASH_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("ASH_CACHE_DIR")
    assert cache_dir() == Path("~/.cache/ash_lightning/calibration").expanduser()


def test_network_identity_changes_with_the_weights_only() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    identity = network_identity("net", net)
    assert identity == {"backbone": "net", "weights": weights_fingerprint(net)}
    assert network_identity("net", copy.deepcopy(net)) == identity  # same weights, another object
    assert network_identity("other", net) != identity
    changed = copy.deepcopy(net)
    with torch.no_grad():
        changed[0].weight[0, 0] += 1e-6
    assert network_identity("net", changed) != identity
    buffers = copy.deepcopy(net)
    buffers[1].running_mean += 1.0  # a buffer is part of the state
    assert network_identity("net", buffers) != identity
    assert network_identity("net", copy.deepcopy(net).double()) != identity  # dtype


def _read_json(path: Path) -> dict:
    entry = json.loads(path.read_text())
    if entry.get("key") != "k":
        raise StaleEntry("holds another key")
    return entry


def test_missing_entry_reads_as_none_without_warning(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_entry(tmp_path / "absent.json", _read_json, "test cache") is None


@pytest.mark.parametrize(
    "content, problem",
    [("{not json", r"is unreadable \(JSONDecodeError"), ('{"key": "other"}', "holds another key")],
)
def test_broken_entry_warns_once_and_is_rebuilt(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "entry.json"
    path.write_text(content)
    with pytest.warns(UserWarning, match=rf"test cache .*entry\.json {problem}.*; rebuilding it\.") as seen:
        assert read_entry(path, _read_json, "test cache") is None
    assert len(seen) == 1
    write_entry(path, lambda tmp: Path(tmp).write_text(canonical_json({"key": "k", "value": 1})), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_entry(path, _read_json, "test cache") == {"key": "k", "value": 1}


def test_write_entry_is_atomic_and_creates_the_folder(tmp_path: Path) -> None:
    path = tmp_path / "new" / "entry.json"
    assert write_entry(path, lambda tmp: Path(tmp).write_text("old"), tmp_path)
    assert path.read_text() == "old"

    def half_written(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_entry(path, half_written, tmp_path)
    assert path.read_text() == "old" and os.listdir(path.parent) == ["entry.json"]  # no temporary file left


def test_unwritable_cache_warns_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")  # the cache folder's place is taken by a file
    path = tmp_path / "a_file" / "entry.json"
    with pytest.warns(
        UserWarning, match=r"cannot write to the cache folder .*Fix: free space there, or set ASH_CACHE_DIR"
    ):
        assert not write_entry(path, lambda tmp: Path(tmp).write_text("x"), tmp_path)
    assert (tmp_path / "a_file").read_text() == ""
