"""OODDataModule's public answers for the caches: each set's identity, the fit data's, and which sets load no
images."""

from __future__ import annotations

import os
from pathlib import Path

from ash_lightning.data import OODDataModule
from tests.conftest import write_npz


def _data(root: Path, **extra: object) -> OODDataModule:
    return OODDataModule(
        id={"kind": "npz", "path": str(root / "id.npz"), "name": "cifar"},
        ood={"dark": f"npz:{root / 'dark.npz'}"},
        backbone="cifar_resnet20",
        batch_size=4,
        **extra,
    )


def test_set_identities_name_each_test_set_and_follow_its_files(tmp_path: Path) -> None:
    write_npz(tmp_path / "id.npz", 7, 0)
    write_npz(tmp_path / "dark.npz", 5, 1)
    identities = _data(tmp_path).test_set_identities()
    assert [(s.name, s.num_samples) for s in identities] == [("cifar", 7), ("dark", 5)]
    cifar = identities[0].data
    assert cifar["spec"]["path"]["value"] == str(tmp_path / "id.npz") and cifar["skip_corrupt"] is False
    assert cifar["transform"]["input_size"] == (3, 32, 32)
    assert _data(tmp_path).test_set_identities() == identities  # the same files: the same identity
    os.utime(tmp_path / "dark.npz", ns=(0, 0))  # replaced in place
    again = _data(tmp_path).test_set_identities()
    assert again[0] == identities[0] and again[1] != identities[1]
    assert _data(tmp_path, skip_corrupt=True).test_set_identities()[0] != identities[0]


def test_fit_identity_is_the_spec_as_written(tmp_path: Path) -> None:
    assert _data(tmp_path).fit_identity() is None
    fit = {"kind": "npz", "path": "$DATASETS/train.npz"}  # need not exist: a cached fit reads no fit data
    identity = _data(tmp_path, fit=fit).fit_identity()
    assert identity is not None and identity["spec"] == fit and identity["transform"]["input_size"] == (3, 32, 32)


def test_sets_loaded_without_images(tmp_path: Path) -> None:
    write_npz(tmp_path / "id.npz", 7, 0)
    write_npz(tmp_path / "dark.npz", 5, 1)
    data = _data(tmp_path)
    data.load_without_images({"dark"})
    cifar, dark = (next(iter(loader)) for loader in data.test_dataloader())
    assert cifar[0].shape == (4, 3, 32, 32) and dark[0].shape == (4, 0) and dark[1].tolist() == [-1] * 4
    data.load_without_images(())
    assert next(iter(data.test_dataloader()[1]))[0].shape == (4, 3, 32, 32)
    data.load_without_images({"dark"})
    data.teardown("test")  # the end of a run: the next one loads every set unless its module says otherwise
    assert next(iter(data.test_dataloader()[1]))[0].shape == (4, 3, 32, 32)
