"""``ash_lightning.files``: path expansion and atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ash_lightning.files import expand_user_vars, write_atomically


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
