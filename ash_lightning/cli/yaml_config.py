"""The YAML loader of configs: jsonargparse's own, after a check that turns two mistakes PyYAML lets through or
reports obscurely into one clear ``UserError`` each: a key repeated in a mapping (PyYAML keeps the last one, so
e.g. a second ``data.ood`` set of the same name silently replaces the first) and a tab character (YAML indents
with spaces only; PyYAML says "found character '\\t' that cannot start any token")."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import yaml

from ash_lightning.errors import UserError


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that raises ``_DuplicateKey`` for a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _where(path: str | os.PathLike, mark: yaml.Mark) -> str:
    return f"{str(path) or 'config'}, line {mark.line + 1}, column {mark.column + 1}"


def check_yaml(text: str, path: str | os.PathLike = "") -> None:
    """A UserError, naming the file, line and column, when ``text`` repeats a key within one mapping or has a
    tab where YAML reads indentation or a token; any other YAML problem is left to the real loader to report."""
    try:
        yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except _DuplicateKey as dup:
        raise UserError(
            f"{_where(path, dup.again)}: key {dup.key!r} is given twice in one mapping (first at line "
            f"{dup.first.line + 1}); YAML would silently keep only the last one. Fix: remove or "
            "rename one of them."
        ) from None
    except yaml.MarkedYAMLError as err:
        mark, lines = err.problem_mark, text.splitlines()
        at = lines[mark.line][mark.column : mark.column + 1] if mark is not None and mark.line < len(lines) else ""
        if mark is not None and (at == "\t" or "tab" in (err.problem or "")):
            raise UserError(
                f"{_where(path, mark)}: a tab character; YAML indents with spaces only. Fix: replace "
                "the tabs in the file with spaces."
            ) from None
    except yaml.YAMLError:
        pass


def strict_loader(load: Callable[[str], Any]) -> Callable[..., Any]:
    """``load`` (a jsonargparse loader: str -> value) preceded by ``check_yaml``."""

    def load_checked(text: str, path: str | os.PathLike = "") -> Any:
        check_yaml(text, path)
        return load(text)

    load_checked.checks_yaml = True  # type: ignore[attr-defined]
    return load_checked


def use_strict_yaml() -> None:
    """Make jsonargparse (so LightningCLI's ``--config`` and its values) load YAML through ``strict_loader``."""
    from jsonargparse import get_loader, set_loader

    current = get_loader("yaml")
    if not getattr(current, "checks_yaml", False):
        set_loader("yaml", strict_loader(current), exceptions=(yaml.YAMLError,))
