"""``ash_lightning._files``: path expansion and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ash_lightning._files import expand_user_vars, writable_directory, write_atomically
from ash_lightning.errors import UserError


def test_expand_user_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_ROOT", "/data")
    monkeypatch.setenv("HOME", "/home/u")
    assert expand_user_vars("$DATA_ROOT/x.npz") == "/data/x.npz"
    assert expand_user_vars(Path("~/ckpt.th")) == "/home/u/ckpt.th"
    monkeypatch.delenv("UNSET_ROOT", raising=False)
    assert expand_user_vars("$UNSET_ROOT/x") == "$UNSET_ROOT/x"


def test_write_atomically_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "scores.npz"
    target.write_text("old")
    seen = []
    write_atomically(target, lambda tmp: (seen.append(tmp), Path(tmp).write_text("new")), suffix=".npz")
    assert target.read_text() == "new"
    assert seen[0].endswith(".npz") and Path(seen[0]).parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == ["scores.npz"]


def test_write_atomically_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "cache.json"
    target.write_text("old")

    def fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]


def test_writable_directory_refuses_files_and_unwritable_folders(tmp_path, monkeypatch):
    assert writable_directory(tmp_path / "new" / "dir", "out") == str(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="ood_metrics.output_dir: .* is a file, not a folder"):
        writable_directory(tmp_path / "file", "ood_metrics.output_dir")
    # Tests run as root here, which may write anywhere: the permission check is what a normal user would meet.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    with pytest.raises(UserError, match="is not writable. Fix: point it at a folder you can write to"):
        writable_directory(locked, "the logger's save_dir")
