"""The three caches (calibration, detectors, features) on shared machines: runs racing on one cache, a full disk,
a read-only cache, and SIGTERM or Ctrl+C before the test loop. Each run's results must equal an uncached run's,
and no partial entry may ever be read."""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from ash_lightning import _cache
from ash_lightning._cache import read_entry, write_entry
from ash_lightning.data import fit_pass
from ash_lightning.detectors import fitting
from ash_lightning.evaluation import feature_cache
from ash_lightning.evaluation.feature_cache import MARKER, EntryWriter, FeatureCache, read_set
from tests.conftest import REPO, main_in_process, tiny_config, write_npz
from tests.run_equality import assert_same_evaluation

SWEEP = {"shaping": ["none", "react@p90"], "score": ["energy", "knn@50"]}
UNWRITABLE = "cannot write to the cache folder"
TRACEBACK = "Traceback (most recent call last)"


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small sets, for speed: ID (40 samples), OOD (24, 20) and ID fit data (56: knn@50 needs 50)."""
    root = tmp_path_factory.mktemp("sets")
    sizes = {"id": (40, 1.0), "dark": (24, 0.4), "bright": (20, 1.6), "fit": (56, 1.0)}
    return {
        name: write_npz(root / f"{name}.npz", n, seed, light) for seed, (name, (n, light)) in enumerate(sizes.items())
    }


def _config(sets: dict[str, Path], checkpoint: Path, out: Path, features: Path | None) -> dict:
    """The sweep over ``sets``, fitted on ``sets["fit"]`` (4 batches of 16), with the feature cache in ``features``."""
    config = tiny_config(sets, checkpoint, out, **SWEEP, feature_cache=features and str(features))
    config["data"]["fit"] = {"kind": "npz", "path": str(sets["fit"])}
    config["ood_metrics"] = {"log_figures": False}
    return config


def _run_dir(out: Path) -> Path:
    return out / "run" / "v"


def _files(folder: Path) -> list[str]:
    """Every file under ``folder``, relative to it (hidden temporary ones included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@contextmanager
def _cache_warnings() -> Iterator[list[str]]:
    """The messages of the cache warnings given in the block (filled when it ends)."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield messages
    messages += [str(w.message) for w in seen if UNWRITABLE in str(w.message)]


def _run(config: dict, tmp_path: Path) -> tuple[int, str, list[str]]:
    """``main_in_process``; (status, stderr, the cache warnings it gave)."""
    with _cache_warnings() as warned:
        status, _, err = main_in_process(config, tmp_path)
    return status, err, warned


@pytest.fixture(scope="module")
def uncached(sets: dict[str, Path], tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of the sweep without a feature cache and with an empty ASH_CACHE_DIR."""
    tmp = tmp_path_factory.mktemp("uncached")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ASH_CACHE_DIR", str(tmp / "cache"))
        status, err, _ = _run(_config(sets, tiny_checkpoint, tmp / "out", None), tmp)
    assert status == 0, err
    return _run_dir(tmp / "out")


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(ASH_CACHE_DIR, the feature cache folder), both under ``tmp_path / "disk"``; warnings start afresh."""
    monkeypatch.setenv("ASH_CACHE_DIR", str(tmp_path / "disk" / "cache"))
    monkeypatch.setattr(_cache, "_warned_folders", set())
    return tmp_path / "disk" / "cache", tmp_path / "disk" / "features"


# ------------------------------------------------------------------------------------------------ concurrent runs
def test_runs_started_together_on_one_cache_equal_an_uncached_run(
    sets: dict[str, Path],
    tiny_checkpoint: Path,
    tmp_path: Path,
    caches: tuple[Path, Path],
    uncached: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calibration, features = caches
    procs = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(_config(sets, tiny_checkpoint, tmp_path / name, features)))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "main.py"), "test", "--config", str(path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=tmp_path,
            )
        )
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert UNWRITABLE not in err and "rebuilding it" not in err  # never a torn entry
    for name in ("a", "b"):
        assert_same_evaluation(_run_dir(tmp_path / name), uncached)
    stored = _files(features) + _files(calibration)
    assert stored and not [f for f in stored if "/." in f or f.startswith(".")]  # no temporary file left
    assert len([f for f in _files(features) if f.endswith(MARKER)]) == 3  # one entry per set

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a third run reads every entry: no warning, no fit pass
        warnings.filterwarnings("ignore", message=f"(?!.*({UNWRITABLE}|rebuilding it))")
        monkeypatch.setattr(fit_pass.FitPass, "run", _no_fit_pass)
        status, _, err = main_in_process(_config(sets, tiny_checkpoint, tmp_path / "c", features), tmp_path)
    assert status == 0, err
    assert_same_evaluation(_run_dir(tmp_path / "c"), uncached)
    assert _files(features) + _files(calibration) == stored


def _no_fit_pass(*args: Any, **kwargs: Any) -> int:
    raise AssertionError("a fit pass ran although the caches hold every fit")


def _filled(n: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    features = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    return features, torch.arange(n), torch.arange(n)


def _writer(root: Path, key: dict, seed: int = 0) -> EntryWriter:
    features, targets, index = _filled(seed=seed)
    writer = EntryWriter(feature_cache.entry_dir(root, key), key, len(features), features.dtype, (3,))
    writer.add(features, targets, index)
    return writer


def test_first_writer_of_a_feature_entry_wins_and_a_broken_one_is_replaced(tmp_path: Path) -> None:
    key = {"k": 1}
    first, second = _writer(tmp_path, key, seed=1), _writer(tmp_path, key, seed=2)  # built side by side
    assert read_set(feature_cache.entry_dir(tmp_path, key), key) is None  # nothing visible before a commit
    assert first.commit() and not second.commit()
    entry = read_set(feature_cache.entry_dir(tmp_path, key), key)
    assert entry is not None and torch.equal(entry.rows(torch.arange(7))[0], _filled(seed=1)[0])
    assert [p.name for p in tmp_path.iterdir()] == [feature_cache.entry_dir(tmp_path, key).name]  # temps removed

    broken = feature_cache.entry_dir(tmp_path, {"k": 2})
    broken.mkdir()
    (broken / "features.npy").write_bytes(b"partial, written in place by an older version")
    assert _writer(tmp_path, {"k": 2}).commit()
    assert read_set(broken, {"k": 2}) is not None and len(list(tmp_path.iterdir())) == 2


# ---------------------------------------------------------------------------------------------------- full disk
@contextmanager
def _full_disk(
    monkeypatch: pytest.MonkeyPatch, disk: Path, steps: tuple[str, ...] = ("replace", "rename", "posix_fallocate")
) -> Iterator[None]:
    """Writes under ``disk`` fail with ENOSPC at ``steps``: ``replace`` and ``rename``, the renames into place of
    entries whose data is written (a file or a folder entry); ``posix_fallocate``, a feature entry's reservation
    of space. Other files (the run's results) are written as usual."""

    def failing(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            if str(dst).startswith(str(disk)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
            return real(src, dst, *args, **kwargs)

        return call

    def reserve(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        for step in steps:
            patch.setattr(os, step, reserve if step == "posix_fallocate" else failing(getattr(os, step)), raising=False)
        yield


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["enospc", "edquot"])
def test_a_write_failing_mid_file_warns_once_and_leaves_nothing(tmp_path: Path, code: int, monkeypatch) -> None:
    monkeypatch.setattr(_cache, "_warned_folders", set())

    def half_then_full(tmp: str) -> None:
        Path(tmp).write_text("half of the ")
        raise OSError(code, os.strerror(code), tmp)

    with _cache_warnings() as warned:
        for name in ("a", "b", "c"):
            assert not write_entry(tmp_path / "detectors" / f"{name}.pt", half_then_full, tmp_path)
    assert len(warned) == 1 and warned[0].startswith(f"{UNWRITABLE} {tmp_path} ({os.strerror(code)}): ")
    assert "Fix: free space there, or set ASH_CACHE_DIR" in warned[0] and _files(tmp_path) == []
    with pytest.raises(OSError, match="No space left") as raised:  # torch alone would raise a RuntimeError
        fitting._save({"key": "k", "fitted": torch.zeros(10_000)}, "/dev/full")
    assert raised.value.errno == errno.ENOSPC


@pytest.mark.parametrize("step", ["posix_fallocate", "rename"], ids=["reserving", "committing"])
def test_a_feature_cache_on_a_full_disk_warns_once_and_stores_nothing(tmp_path: Path, step: str, monkeypatch) -> None:
    monkeypatch.setattr(_cache, "_warned_folders", set())
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2))
    sets = [(name, {"set": name}, 7) for name in ("id", "ood")]
    with _full_disk(monkeypatch, tmp_path, (step,)), _cache_warnings() as warned:
        cache = FeatureCache(tmp_path, sets, 2**30, model, "penultimate")
        for loader in range(2):
            features, targets, index = _filled()
            shared, _, _ = cache.shared(loader, targets, index, lambda f=features: f)
            assert torch.equal(shared, features)  # the run goes on with the computed features
    assert len(warned) == 1 and f"{UNWRITABLE} {tmp_path} (No space left on device)" in warned[0]
    assert "point model.feature_cache at a writable folder" in warned[0]
    assert not cache.writable and _files(tmp_path) == []
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_runs_on_a_full_disk_equal_an_uncached_run_and_leave_no_entry(
    sets: dict[str, Path],
    tiny_checkpoint: Path,
    tmp_path: Path,
    caches: tuple[Path, Path],
    uncached: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calibration, features = caches
    for attempt in ("first", "next"):
        _cache._warned_folders.clear()  # the next run is another process
        with _full_disk(monkeypatch, tmp_path / "disk"):
            status, err, warned = _run(_config(sets, tiny_checkpoint, tmp_path / attempt, features), tmp_path)
        assert status == 0, err
        assert len(warned) == 2 and {str(calibration), str(features)} == {w.split()[6] for w in warned}, warned
        assert "No space left on device" in warned[0] and "rebuilding it" not in err
        assert_same_evaluation(_run_dir(tmp_path / attempt), uncached)
        gc.collect()
        assert _files(tmp_path / "disk") == []


# ------------------------------------------------------------------------------------------------ read-only cache
def _read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """``os.access`` says nothing under ``folder`` is writable (chmod does not stop root)."""
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: not str(path).startswith(str(folder)) and real(path, mode, **kw)
    )


def _count_calls(monkeypatch: pytest.MonkeyPatch, target: Any, name: str) -> list[int]:
    """``target.name`` counts its calls in the returned one-item list."""
    real, calls = getattr(target, name), [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, counted)
    return calls


def test_a_read_only_cache_is_read_and_warns_once(
    sets: dict[str, Path],
    tiny_checkpoint: Path,
    tmp_path: Path,
    caches: tuple[Path, Path],
    uncached: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The uncached run's calibration and detector entries, one of them missing, in a read-only ASH_CACHE_DIR;
    an empty read-only feature cache."""
    calibration, features = caches
    shutil.copytree(uncached.parents[2] / "cache", calibration)
    missing = sorted((calibration / "detectors").iterdir())[0]
    missing.unlink()
    stored = _files(tmp_path / "disk")
    _read_only(monkeypatch, tmp_path / "disk")
    fit_batches = _count_calls(monkeypatch, fit_pass, "fit_images")
    status, err, warned = _run(_config(sets, tiny_checkpoint, tmp_path / "ro", features), tmp_path)
    assert status == 0, err
    assert fit_batches == [4]  # one pass, for the missing detector only: the calibration entry was read
    assert len(warned) == 2 and all("(read-only: not writable)" in w for w in warned), warned
    assert {str(calibration), str(features)} == {w.split()[6] for w in warned}
    assert _files(tmp_path / "disk") == stored
    assert_same_evaluation(_run_dir(tmp_path / "ro"), uncached)


def test_a_read_only_feature_cache_reads_its_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cache, "_warned_folders", set())
    assert _writer(tmp_path, {"set": "id"}).commit()
    _read_only(monkeypatch, tmp_path)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2))
    with _cache_warnings() as warned:
        writable = _cache.writable_cache_folder(tmp_path, tmp_path, feature_cache.FIX)
        cache = FeatureCache(
            tmp_path, [("id", {"set": "id"}, 7), ("ood", {"set": "ood"}, 7)], 2**30, model, "penultimate", writable
        )
        features, targets, index = _filled(seed=5)
        assert torch.equal(cache.shared(1, targets, index, lambda: features)[0], features)
    assert len(warned) == 1 and f"{UNWRITABLE} {tmp_path} (read-only" in warned[0]
    assert cache.complete_sets == {"id"} and len(list(tmp_path.iterdir())) == 1  # read, and nothing written
    stored = cache.shared(0, targets, index, lambda: pytest.fail("computed although stored"))[0]
    assert torch.equal(stored, _filled()[0])


# ------------------------------------------------------------------------------------- signals before the test loop
def _signal_at(monkeypatch: pytest.MonkeyPatch, target: Any, name: str, call: int, signum: int) -> None:
    """``target.name`` sends ``signum`` to this process at its ``call``-th call (1-based)."""
    real, calls = getattr(target, name), [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapped)


def _stop_main_py_in_feature_cache_build(config: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """``main.py test`` in its own process, signalled from outside with SIGTERM once the feature cache of the ID
    set is being built (each stored batch touches a marker file and takes 0.2 s more)."""
    marker = tmp_path / "build_started"
    slow = textwrap.dedent(
        f"""
        import pathlib, sys, time
        from ash_lightning.cli.app import main
        from ash_lightning.evaluation.feature_cache import EntryWriter
        real = EntryWriter.add
        def slow(*args):
            pathlib.Path({str(marker)!r}).touch()
            time.sleep(0.2)
            return real(*args)
        EntryWriter.add = slow
        sys.exit(main())
        """
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-c", slow, "test", "--config", str(path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert marker.exists(), err[-3000:]
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_signals_before_the_test_loop_stop_the_run_and_leave_no_entry_to_read(
    sets: dict[str, Path],
    tiny_checkpoint: Path,
    tmp_path: Path,
    caches: tuple[Path, Path],
    uncached: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On one cache, one after the other: SIGTERM in the calibration pass, Ctrl+C in the detector pass (this
    process, a real signal: fit_images, 4 batches per pass, sends it), SIGTERM while main.py builds the feature
    cache; then a rerun."""
    calibration, features = caches
    config = lambda name: _config(sets, tiny_checkpoint, tmp_path / name, features)  # noqa: E731
    for signum, call in ((signal.SIGTERM, 2), (signal.SIGINT, 6)):
        with monkeypatch.context() as patch:
            _signal_at(patch, fit_pass, "fit_images", call, signum)
            status, err, _ = _run(config(signal.Signals(signum).name), tmp_path)
        assert status == 128 + signum, err
        assert f"stopped by {signal.Signals(signum).name}" in err and TRACEBACK not in err
        # what a later run could read (hidden temporary folders never are: main.py's process removes them at exit)
        left = [f for f in _files(tmp_path / "disk") if "/." not in f]
        if signum == signal.SIGTERM:
            assert left == []
        else:  # the calibration's pass was whole: its entry only
            assert len(left) == 1 and left[0].startswith("cache/") and "detectors" not in left[0]

    proc = _stop_main_py_in_feature_cache_build(config("build"), tmp_path)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert TRACEBACK not in proc.stderr and "stopped by SIGTERM" in proc.stderr
    assert _files(features) == [] and len(_files(calibration)) == 1 + 2  # not even a temporary feature file

    status, err, _ = _run(config("rerun"), tmp_path)
    assert status == 0, err
    assert_same_evaluation(_run_dir(tmp_path / "rerun"), uncached)


def test_a_stopped_fit_pass_collects_nothing_more() -> None:
    batches = [torch.zeros(2, 3)] * 5
    taken: list[int] = []

    def stop() -> None:
        if len(taken) == 2:
            raise KeyboardInterrupt

    model = torch.nn.Linear(3, 1)
    with pytest.raises(KeyboardInterrupt):
        fit_pass.FitPass(lambda: batches, stop=stop).run(
            model, lambda batch: taken.append(len(batch.images)), what="x", no_data=""
        )
    assert taken == [2, 2] and model.training


def test_stop_on_signal_reads_the_trainer_and_its_callbacks() -> None:
    class Trainer:
        received_sigterm = False
        callbacks: list[Any] = [object()]

    trainer = Trainer()
    stop = fit_pass.stop_on_signal(trainer)
    stop()  # nothing received: goes on
    trainer.callbacks.append(type("Held", (), {"stop_requested": True})())
    with pytest.raises(KeyboardInterrupt):
        stop()
    trainer.received_sigterm = True
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException
        stop()


def test_entries_already_there_are_read_from_a_read_only_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(_cache, "_warned_folders", set())
    path = tmp_path / "entry.json"
    assert write_entry(path, lambda tmp: Path(tmp).write_text(json.dumps({"v": 1})), tmp_path)
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with _cache_warnings() as warned:
        assert not write_entry(tmp_path / "other.json", lambda tmp: Path(tmp).write_text("{}"), tmp_path)
        assert not write_entry(tmp_path / "third.json", lambda tmp: Path(tmp).write_text("{}"), tmp_path)
    assert len(warned) == 1 and f"{UNWRITABLE} {tmp_path} (read-only" in warned[0]
    assert _files(tmp_path) == ["entry.json"]
    assert read_entry(path, lambda p: json.loads(p.read_text()), "test cache") == {"v": 1}
