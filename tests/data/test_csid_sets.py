"""``data.csid``: covariate-shifted ID sets as test loaders of role ``csid`` after the OOD sets, their checks, and
``resize: false`` (OpenOOD's ImageNet-C preprocessing: no resize or crop)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from ash_lightning.data import OODDataModule
from ash_lightning.errors import UserError
from tests.conftest import write_npz

NOISE = {"kind": "gaussian", "num_samples": 4, "size": 8}


def _data(**options: object) -> OODDataModule:
    return OODDataModule(id=NOISE, ood={"far": {**NOISE, "kind": "uniform"}}, backbone="cifar_resnet20", **options)


def test_csid_sets_are_test_loaders_after_the_ood_sets_and_before_validation(tmp_path: Path) -> None:
    data = _data(
        csid={"shifted": f"npz:{write_npz(tmp_path / 'a.npz', 5, 0)}", "tinted": {**NOISE, "seed": 1}},
        val_id=NOISE,
        val_ood={"far": NOISE},
    )
    assert [(info.name, info.role) for info in data.loaders] == [
        ("id", "id"),
        ("far", "ood"),
        ("shifted", "csid"),
        ("tinted", "csid"),
        ("val_id", "val_id"),
        ("val_far", "val_ood"),
    ]
    assert data.ood_names == ["far"]
    loaders = data.test_dataloader()
    assert [len(loader.dataset) for loader in loaders] == [4, 4, 5, 4, 4, 4]
    assert [s.name for s in data.test_set_identities()][2:4] == ["shifted", "tinted"]
    assert [info.role for info in _data(csid={}).loaders] == ["id", "ood"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"csid": ["npz:x.npz"]}, r"^data\.csid must map each covariate-shifted ID set's name to its spec"),
        ({"csid": {"far": NOISE}}, r"^data\.csid\.far and data\.ood\.far are both named 'far'"),
        ({"csid": {"c": {**NOISE, "resize": "no"}}}, r"^data\.csid\.c\.resize: 'no' is not true or false\. Fix:"),
        ({"fit": {**NOISE, "resize": 0}}, r"^data\.fit\.resize: 0 is not true or false"),
    ],
    ids=["not_a_mapping", "name_taken", "resize_not_bool", "resize_on_fit"],
)
def test_mistakes_are_one_line_naming_the_fix(options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as raised:
        _data(**options)
    assert "\n" not in str(raised.value)


def test_a_missing_csid_set_says_how_to_run_without_the_csid_sets(tmp_path: Path) -> None:
    data = _data(csid={"shifted": f"npz:{tmp_path / 'not_downloaded.npz'}"})
    with pytest.raises(UserError, match=r"^data\.csid\.shifted: path .* does not exist\. .* --data\.csid '\{\}'\.$"):
        data.setup("test")


def test_resize_false_only_converts_and_normalises_images_at_the_input_size(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", x=pixels, y=np.arange(3))
    np.savez(tmp_path / "big.npz", x=np.zeros((2, 40, 40, 3), np.uint8), y=np.arange(2))
    data = _data(
        csid={
            "c": {"kind": "npz", "path": str(tmp_path / "c.npz"), "resize": False},
            "resized": {"kind": "npz", "path": str(tmp_path / "c.npz")},
            "big": {"kind": "npz", "path": str(tmp_path / "big.npz"), "resize": False},
        },
        crop_pct=0.875,  # the other sets' images are resized to 37 pixels, then cropped to 32
    )
    cfg = data.data_config()
    assert cfg["input_size"] == (3, 32, 32)
    c, resized, big = data.test_dataloader()[2:]
    images, targets, index = next(iter(c))
    expected = transforms.Normalize(cfg["mean"], cfg["std"])(
        torch.stack([transforms.ToTensor()(Image.fromarray(p)) for p in pixels])
    )
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    assert targets.tolist() == index.tolist() == [0, 1, 2]
    assert not torch.equal(next(iter(resized))[0], images)
    with pytest.raises(UserError, match=r"^data\.csid\.big: an image is 40×40 pixels, but `resize: false` takes"):
        next(iter(big))
