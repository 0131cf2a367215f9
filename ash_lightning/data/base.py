"""What every data source is: a ``Source`` (a data set of ``(PIL image, target)`` and its file paths), checked
user paths, and image files decoded with errors that name the file. ``sources`` and ``imglist`` build on it."""

from __future__ import annotations

import os
from collections.abc import Sized
from dataclasses import dataclass
from typing import cast

from PIL import Image
from torch.utils.data import Dataset

from ash_lightning._files import check_path, expand_set_vars
from ash_lightning.data.images import to_rgb8
from ash_lightning.errors import UserError


@dataclass
class Source:
    """A data set of ``(PIL image, target)`` pairs and, for files on disk, the path of each sample."""

    dataset: Dataset
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(cast(Sized, self.dataset))  # torch's Dataset declares no __len__; these are all map-style


def expand_path(path: str | os.PathLike, what: str, want: str = "file", fix: str | None = None) -> str:
    """Expand ``~`` and ``$VARS``; a UserError if an unset variable is left or the path is not a readable ``want``
    (``"file"`` or ``"folder"``; ``check_path`` names the cause), whose fix is ``fix`` where the cause has none of
    its own (default: check the path)."""
    expanded = expand_set_vars(path, what)
    default = "check the path in the config (environment variables such as $DATASETS are expanded)"
    return check_path(expanded, want, f"{what}: path", fix or default)


class FileSource(Dataset):
    """Image files with targets; decoding errors surface as ``CorruptImageError`` naming the file."""

    def __init__(self, paths: list[str], targets: list[int]) -> None:
        self.paths, self.targets = paths, targets

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        try:
            with Image.open(self.paths[i]) as img:
                return to_rgb8(img), self.targets[i]
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise CorruptImageError(self.paths[i], f"{err.__class__.__name__}: {err}") from err


class CorruptImageError(UserError):
    """An image file that cannot be decoded; ``reason`` says why (the decoder's error)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"cannot decode image {path!r} ({reason}). Fix: remove or replace the file, or set "
            "skip_corrupt: true to skip such files with a warning."
        )
        self.path = path
