"""``main.py`` keeps freed memory in the process (glibc mallopt) unless ASH_KEEP_FREED_MEMORY=0."""

from __future__ import annotations

import platform

import pytest

from ash_lightning.cli import allocator
from ash_lightning.cli import app as cli


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_applies_on_glibc() -> None:
    assert allocator.keep_freed_memory() is True


@pytest.mark.parametrize("env, applied", [(None, True), ("1", True), ("0", False)])
def test_cli_applies_it_before_running_unless_disabled(
    monkeypatch: pytest.MonkeyPatch, env: str | None, applied: bool
) -> None:
    events: list[str] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: events.append("keep") or True)
    monkeypatch.setattr(cli._CLI, "run", staticmethod(lambda args, command: events.append("run")))
    if env is None:
        monkeypatch.delenv(allocator.KEEP_FREED_MEMORY_ENV, raising=False)
    else:
        monkeypatch.setenv(allocator.KEEP_FREED_MEMORY_ENV, env)
    assert cli.main(["test", "--config", "unused.yaml"]) == 0
    assert events == (["keep", "run"] if applied else ["run"])
