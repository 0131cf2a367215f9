"""The house plan: folders by concept in layers, imports only downwards, no import circle, a small root."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ash_lightning"

# Each top-level module or folder of the package, by layer: a module may import its own layer or lower ones.
LAYERS = {
    "errors": 0,
    "_files": 1,
    "_options": 1,
    "_registry": 1,
    "_cache": 1,
    "lightning_packages": 1,
    "models": 2,
    "data": 3,
    "scores": 4,
    "shaping": 4,
    "detectors": 5,
    "evaluation": 6,
    "module": 7,
    "callbacks": 8,
    "deploy": 8,
    "cli": 9,
    "lightning": 10,
    "demo": 10,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every ``ash_lightning`` module each module imports, anywhere in its code (function bodies too)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ash_lightning"):
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in modules and t != name}
    return edges


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_top_level_module_has_a_layer() -> None:
    tops = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    tops |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert tops == set(LAYERS)
    assert len([p for p in PACKAGE.glob("*.py") if p.stem != "__init__"]) <= 10


def test_imports_only_go_to_the_same_or_a_lower_layer() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in _imports().items()
        for target in targets
        if _top(module) and LAYERS[_top(target)] > LAYERS[_top(module)]
    ]
    assert not upward


def test_no_import_circle() -> None:
    edges = _imports()
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in edges[module]:
            if target.startswith(module + "."):
                continue  # a package's __init__ re-exporting its own modules
            if state.get(target) == 1:
                circles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in list(edges):
        if module not in state:
            visit(module, [module])
    assert not circles


def test_the_package_and_its_cli_import_no_lightning_package() -> None:
    """``main.py list``/``report``/``--help`` and the functional API start without Lightning (about 1 s of imports
    on 2 cores); the data module, the module and the callbacks import it on first use."""
    probe = (
        "import sys, ash_lightning, ash_lightning.cli, ash_lightning.data, ash_lightning.lightning_packages\n"
        "print(sorted(m for m in ('pytorch_lightning', 'lightning', 'lightning_fabric') if m in sys.modules))\n"
        "from ash_lightning.data import OODDataModule\n"
        "from ash_lightning.lightning_packages import CALLBACK_BASES\n"
        "print(OODDataModule.__name__, len(CALLBACK_BASES) >= 1, 'pytorch_lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "OODDataModule True True"
