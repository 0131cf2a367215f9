"""OpenOOD's image lists: ``{kind: imglist, list: <benchmark_imglist/.../x.txt>, root: <image root>}``.

Each line of a list is ``<path relative to root> <label>``, split at the FIRST space exactly as OpenOOD's
``ImglistDataset.getitem`` does (Jingkang50/OpenOOD, openood/datasets/imglist_dataset.py:
``line.strip('\\n').split(' ', 1)``), so paths cannot contain spaces. The label is an int (-1, or any label, for
OOD sets) or, as OpenOOD also accepts, a Python dict literal holding ``'label'``. Blank lines are ignored.
Every listed image must exist; this is checked when the list is read, before anything runs. Images are decoded
like a ``folder`` source's (``FileSource``: undecodable files raise ``CorruptImageError``, or are skipped with
``skip_corrupt``).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Mapping
from typing import Any

from ash_lightning.data.base import FileSource, Source, expand_path
from ash_lightning.errors import UserError

_FORMAT = "each line must be '<path relative to root> <label>', e.g. 'cifar10/test/airplane/0001.png 0'"


def parse_label(text: str) -> int:
    """The label after the path: an int, or a dict literal with an int ``'label'``; ValueError otherwise."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        extras = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"label {text!r} is not an integer") from None
    if isinstance(extras, dict) and isinstance(extras.get("label"), int):
        return extras["label"]
    raise ValueError(f"label {text!r} is neither an integer nor a dict with an integer 'label'")


def read_imglist(list_path: str, root: str) -> tuple[list[str], list[int]]:
    """Absolute image paths and labels of an OpenOOD image list; a UserError names the line of a malformed
    entry, the first missing image (with its line), or an empty list."""
    paths, targets, missing = [], [], []
    with open(list_path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            relative, _, label = line.partition(" ")
            try:
                if not relative or not label.strip():
                    raise ValueError("no label after the path" if relative else "it starts with a space")
                if os.path.isabs(relative):
                    raise ValueError(f"path {relative!r} is absolute, not relative to root")
                target = parse_label(label)
            except ValueError as err:
                raise UserError(
                    f"{list_path}:{number}: malformed image list line {line!r} ({err}); {_FORMAT}. "
                    "Fix: correct that line."
                ) from None
            path = os.path.join(root, relative)
            if not os.path.isfile(path):
                missing.append((number, path))
            paths.append(path)
            targets.append(target)
    if missing:
        number, path = missing[0]
        raise UserError(
            f"{list_path}:{number}: image {path!r} not found ({len(missing)} of the {len(paths)} listed "
            "images are missing). Fix: set `root` to the folder the list's paths are relative to (for "
            "OpenOOD: images_classic or images_largescale), or download the missing images."
        )
    if not paths:
        raise UserError(f"image list {list_path!r} is empty. Fix: point `list` at a non-empty OpenOOD image list.")
    return paths, targets


def imglist_source(spec: Mapping[str, Any], what: str) -> Source:
    """The ``imglist`` kind of ``build_source``: the images of ``spec["list"]`` under ``spec["root"]``."""
    for key in ("list", "root"):
        if not spec.get(key):
            raise UserError(
                f"{what}: kind 'imglist' needs `{key}` (got {spec.get(key)!r}). Fix: e.g. {{kind: "
                "imglist, list: $DATASETS/benchmark_imglist/cifar10/test_cifar10.txt, root: "
                "$DATASETS/images_classic}."
            )
    list_path = expand_path(spec["list"], f"{what}.list", fix="point `list` at an image list (.txt)")
    root = expand_path(
        spec["root"], f"{what}.root", "folder", "point `root` at the folder the list's paths are relative to"
    )
    try:
        paths, targets = read_imglist(list_path, root)
    except UnicodeDecodeError as err:
        raise UserError(
            f"{what}.list: {list_path!r} is not a text file ({err.reason}). Fix: point `list` at an OpenOOD image list."
        ) from None
    except UserError as err:
        raise UserError(f"{what}: {err}") from None
    return Source(FileSource(paths, targets), paths)
