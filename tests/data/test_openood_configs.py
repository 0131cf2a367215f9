"""OpenOOD v1.5: every ``configs/openood_v1.5/*.yaml`` runs end to end on a miniature OpenOOD data tree, the
``imglist`` source reads OpenOOD's list format and fails in one line on bad lists, and OpenOOD's ResNet-18
state_dicts load into the architectures registered in timm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image

from ash_lightning.data import build_source
from ash_lightning.errors import UserError
from ash_lightning.models.backbone import create_backbone
from tests.conftest import REPO, main_in_process, write_image_folder

CONFIGS = sorted((REPO / "configs" / "openood_v1.5").glob("*.yaml"))
IMAGES_PER_LIST = 2

# What OpenOOD v1.5 evaluates (openood/evaluation_api/datasets.py, DATA_INFO): per benchmark, the image root of its
# ID sets, the near and far OOD sets and the OOD validation set. Test lists are test_<set>.txt, validation lists
# val_<set>.txt, under benchmark_imglist/<benchmark>/; Textures lives in images_classic/texture.
BENCHMARKS = {
    "cifar10": ("images_classic", ["cifar100", "tin"], ["mnist", "svhn", "texture", "places365"], "tin"),
    "cifar100": ("images_classic", ["cifar10", "tin"], ["mnist", "svhn", "texture", "places365"], "tin"),
    "imagenet200": (
        "images_largescale",
        ["ssb_hard", "ninco"],
        ["inaturalist", "textures", "openimage_o"],
        "openimage_o",
    ),
    "imagenet": ("images_largescale", ["ssb_hard", "ninco"], ["inaturalist", "textures", "openimage_o"], "openimage_o"),
}
# The covariate-shifted ID sets of each benchmark (DATA_INFO[...]["csid"]["datasets"], in order) and their list names.
CSID = {
    "cifar10": {"cifar10c": "test_cifar10c"},
    "cifar100": {},
    "imagenet200": {
        "imagenet_v2": "test_imagenet200_v2",
        "imagenet_c": "test_imagenet200_c",
        "imagenet_r": "test_imagenet200_r",
    },
    "imagenet": {
        "imagenet_v2": "test_imagenet_v2",
        "imagenet_c": "test_imagenet_c",
        "imagenet_r": "test_imagenet_r",
        "imagenet_es": "test_imagenet_es",
    },
}
AT_INPUT_SIZE = {"imagenet_c": 224}  # stored at the network's input size (read with `resize: false`)
# The image folder each set's list points into (as in OpenOOD's lists: "<folder>/<split or class>/<file>").
FOLDERS = {
    "cifar10": "cifar10/test",
    "cifar100": "cifar100/test",
    "tin": "tin/test",
    "mnist": "mnist/test",
    "svhn": "svhn/test",
    "texture": "texture/banded",
    "textures": "texture/banded",
    "places365": "places365/abbey",
    "imagenet200": "imagenet_1k/val",
    "imagenet": "imagenet_1k/val",
    "ssb_hard": "ssb_hard/n00470682",
    "ninco": "ninco/amphiuma_means",
    "inaturalist": "inaturalist/Images",
    "openimage_o": "openimage_o/images",
    "cifar10c": "cifar10c/gaussian_noise/5",
    "imagenet_v2": "imagenet_v2/0",
    "imagenet_c": "imagenet_c/blur/defocus_blur/5/n01440764",
    "imagenet_r": "imagenet_r/n01443537",
    "imagenet_es": "imagenet_es/es-test/param_control/l1/param_1",
}
# A backbone override only where the config's network is too slow for a CPU test: a ViT-Ti of the same family.
BACKBONE_OVERRIDES = {"imagenet_vit_b16.yaml": "vit_tiny_patch16_224"}


def _write_list(
    tree: Path,
    benchmark: str,
    list_name: str,
    images_root: str,
    folder: str,
    label: int | None,
    shape: tuple[int, int],
    seed: int,
) -> None:
    """``IMAGES_PER_LIST`` JPEGs of ``shape`` (H, W) under ``tree/images_root/folder``, and their list."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(IMAGES_PER_LIST):
        relative = f"{folder}/{list_name}_{i:04d}.jpg"
        (tree / images_root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(tree / images_root / relative)
        lines.append(f"{relative} {i % 3 if label is None else label}")
    path = tree / "benchmark_imglist" / benchmark / f"{list_name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def build_openood_tree(tree: Path) -> Path:
    """A miniature of the folder OpenOOD's download script fills: every list of the four v1.5 benchmarks, in its
    exact format (``relative/path label``, -1 for OOD sets), with a few generated JPEGs behind each line (not square,
    except ImageNet-C's, which are stored at the input size)."""
    seed = 0
    for benchmark, (images_root, near, far, val_ood) in BENCHMARKS.items():
        size = 32 if benchmark.startswith("cifar") else 64
        lists = [
            (f"test_{benchmark}", images_root, benchmark, None),
            (f"val_{benchmark}", images_root, benchmark, None),
            (f"val_{val_ood}", images_root, val_ood, -1),
        ]
        lists += [
            (f"test_{name}", "images_classic" if name.startswith("texture") else images_root, name, -1)
            for name in near + far
        ]
        lists += [(list_name, images_root, name, None) for name, list_name in CSID[benchmark].items()]
        for list_name, root, folder_key, label in lists:
            seed += 1
            side = AT_INPUT_SIZE.get(folder_key)
            shape = (side, side) if side else (size, size + 8)
            _write_list(tree, benchmark, list_name, root, FOLDERS[folder_key], label, shape, seed)
    return tree


@pytest.fixture(scope="module")
def openood_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_openood_tree(tmp_path_factory.mktemp("openood_data"))


def _run(config: Path, tree: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """``main.py test --config <config>`` with random weights, on CPU, in a subprocess reading ``tree``."""
    overrides = [
        "--model.pretrained",
        "false",
        "--model.checkpoint_path",
        "null",
        "--data.batch_size",
        "4",
        "--data.num_workers",
        "0",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
    ]
    return subprocess.run(
        [sys.executable, str(REPO / "main.py"), "test", "--config", str(config), *overrides, *extra],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env={**os.environ, "DATASETS": str(tree), "CHECKPOINTS": str(cwd / "no_checkpoints")},
    )


def test_there_is_a_config_per_benchmark() -> None:
    benchmarks = {yaml_data.stem for yaml_data in (REPO / "configs" / "openood_v1.5" / "data").glob("*.yaml")}
    assert benchmarks == set(BENCHMARKS)
    assert {c.name.split("_")[0] for c in CONFIGS} == set(BENCHMARKS)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_runs_end_to_end_on_a_miniature_openood_tree(config: Path, openood_tree: Path, tmp_path: Path) -> None:
    benchmark = config.name.split("_")[0]
    _, near, far, val_ood = BENCHMARKS[benchmark]
    backbone = BACKBONE_OVERRIDES.get(config.name)
    proc = _run(config, openood_tree, tmp_path, *(["--model.backbone", backbone] if backbone else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_path,) = tmp_path.glob("runs/*/version_*/ood_results.json")
    results = json.loads(results_path.read_text())
    assert results["id"] == benchmark and results["convention"] == "openood"
    assert results["ood_sets"] == near + far and results["groups"] == {"near": near, "far": far}
    assert results["selected"]["shaping"].startswith("ash_s@")  # chosen on val_<benchmark> against val_<val_ood>
    csid = list(CSID[benchmark])
    assert results.get("csid_sets", []) == csid
    assert {name: results["counts"][name] for name in csid} == dict.fromkeys(csid, IMAGES_PER_LIST)
    for run in results["runs"]:
        assert set(run["ood"]) == set(near + far)
        assert all(0 <= m["auroc"] <= 1 for m in run["ood"].values())
        if csid:
            assert set(run["fsood"]["ood"]) == set(near + far) and set(run["fsood"]["groups"]) == {"near", "far"}
            assert list(run["fsood"]["csid_accuracy"]) == csid
            assert all(0 <= m["auroc"] <= 1 for m in run["fsood"]["ood"].values())
        else:
            assert "fsood" not in run


def _broken_tree(tree: Path, benchmark: str, list_name: str, edit: str) -> None:
    path = tree / "benchmark_imglist" / benchmark / f"{list_name}.txt"
    lines = path.read_text().splitlines()
    if edit == "missing image":
        lines.append("tin/test/not_downloaded.jpg -1")
    elif edit == "malformed line":
        lines.append("tin/test/no_label.jpg")
    elif edit == "bad label":
        lines.append("tin/test/x.jpg minus_one")
    else:
        lines = []
    path.write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize(
    "edit, expected",
    [
        ("missing image", "test_tin.txt:3: image '"),
        ("malformed line", "test_tin.txt:3: malformed image list line"),
        ("bad label", "test_tin.txt:3: malformed image list line"),
        ("empty list", "test_tin.txt' is empty"),
    ],
)
def test_imglist_errors_exit_2_with_one_error_line(
    edit: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI in-process on the CIFAR-10 config with one list broken (the subprocess test below covers the exit
    status and the absence of a traceback at the process boundary)."""
    tree = build_openood_tree(tmp_path / "data")
    _broken_tree(tree, "cifar10", "test_tin", edit)
    monkeypatch.setenv("DATASETS", str(tree))
    monkeypatch.delenv("ASH_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    config = {
        "model": {"backbone": "openood_resnet18_32x32.openood_v15_cifar10", "shaping": "ash_s@90"},
        "data": str(REPO / "configs" / "openood_v1.5" / "data" / "cifar10.yaml"),
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False},
    }
    status, _, err = main_in_process(config, tmp_path)
    assert status == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0] and "data.ood.tin" in errors[0], err[-2000:]
    assert "Traceback" not in err
    assert not list(tmp_path.glob("**/ood_results.json"))


def test_without_the_csid_images_the_error_says_how_to_run_without_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """download.py's ood_v1.5 does not fetch CIFAR-10-C: the run stops naming it, and --data.csid '{}' runs without."""
    tree = build_openood_tree(tmp_path / "data")
    for image in (tree / "images_classic" / "cifar10c").rglob("*.jpg"):
        image.unlink()
    monkeypatch.setenv("DATASETS", str(tree))
    monkeypatch.delenv("ASH_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    config = {
        "model": {"backbone": "openood_resnet18_32x32.openood_v15_cifar10", "shaping": "ash_s@90"},
        "data": str(REPO / "configs" / "openood_v1.5" / "data" / "cifar10.yaml"),
        "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False},
        "ood_metrics": {"output_dir": str(tmp_path / "out")},
    }
    status, _, err = main_in_process(config, tmp_path, "--data.num_workers", "0")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1, err[-2000:]
    assert "data.csid.cifar10c: " in errors[0] and "test_cifar10c.txt:1: image" in errors[0]
    assert errors[0].endswith("Or leave the covariate-shifted ID sets out: --data.csid '{}'.")
    status, _, err = main_in_process(config, tmp_path, "--data.num_workers", "0", "--data.csid", "{}")
    assert status == 0, err[-2000:]
    results = json.loads((tmp_path / "out" / "ood_results.json").read_text())
    assert "csid_sets" not in results and "cifar10c" not in results["counts"]


def test_missing_image_through_main_py_exits_2_without_traceback(tmp_path: Path) -> None:
    tree = tmp_path / "data"
    build_openood_tree(tree)
    missing = tree / "images_classic" / FOLDERS["svhn"] / "test_svhn_0001.jpg"
    missing.unlink()
    proc = _run(REPO / "configs" / "openood_v1.5" / "cifar10_resnet18.yaml", tree, tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "test_svhn.txt:2:" in error and str(missing) in error


def test_imglist_reads_openood_lines(tmp_path: Path) -> None:
    """Split at the first space as OpenOOD does; int labels or dict literals; blank lines ignored; CRLF accepted."""
    write_image_folder(tmp_path / "img" / "a", 3, seed=0)
    listing = tmp_path / "list.txt"
    listing.write_text("a/img000.png 4\r\n\na/img001.jpg {'label': 7}\na/img002.png -1\n")
    source = build_source({"kind": "imglist", "list": str(listing), "root": str(tmp_path / "img")}, "data.id")
    assert [source.dataset[i][1] for i in range(len(source))] == [4, 7, -1]
    assert source.paths == [str(tmp_path / "img" / "a" / f) for f in ("img000.png", "img001.jpg", "img002.png")]
    assert source.dataset[1][0].mode == "RGB" and source.dataset[1][0].size == (32, 32)


@pytest.mark.parametrize(
    "spec_edit, expected",
    [
        ({"list": "$DATASETS_MISSING/list.txt"}, "DATASETS_MISSING, which is not set"),
        ({"list": "nowhere.txt"}, "does not exist"),
        ({"root": None}, "needs `root`"),
        ({"list": "img"}, "is a folder, not a file"),
    ],
)
def test_imglist_spec_errors_name_the_key(
    spec_edit: dict, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_image_folder(tmp_path / "img", 1, seed=0)
    (tmp_path / "list.txt").write_text("img000.png 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATASETS_MISSING", raising=False)
    spec = {"kind": "imglist", "list": "list.txt", "root": "img", **spec_edit}
    with pytest.raises(UserError, match=expected):
        build_source(spec, "data.id")


def test_corrupt_image_in_a_list_is_skipped_with_skip_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_image_folder(tmp_path / "img", 4, seed=0, truncated=("cut.jpg",))
    (tmp_path / "id.txt").write_text("".join(f"img{i:03d}.{'jpg' if i % 2 else 'png'} {i}\n" for i in range(4)))
    (tmp_path / "ood.txt").write_text("img000.png -1\ncut.jpg -1\nimg001.jpg -1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ASH_DEBUG", raising=False)
    spec = {"kind": "imglist", "root": str(tmp_path / "img")}
    config = {
        "model": {"backbone": "openood_resnet18_32x32.openood_v15_cifar10", "shaping": "ash_s@90"},
        "data": {"id": {**spec, "list": "id.txt"}, "ood": {"noisy": {**spec, "list": "ood.txt"}}, "batch_size": 2},
        "trainer": {
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "logger": {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": "run", "version": "v"},
            },
        },
    }
    status, _, err = main_in_process(config, tmp_path)
    assert status == 2 and "cut.jpg" in err and "skip_corrupt" in err
    config["data"]["skip_corrupt"] = True
    status, _, err = main_in_process(config, tmp_path)
    assert status == 0, err[-2000:]
    results = json.loads((tmp_path / "runs" / "run" / "v" / "ood_results.json").read_text())
    assert json.dumps(results["skipped"]).count("cut.jpg") == 1


def _openood_resnet18_32x32_shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer names and shapes of OpenOOD's ResNet18_32x32 (openood/networks/resnet18_32x32.py):
    conv1/bn1 stem, layer1-4 of two BasicBlocks (conv1, bn1, conv2, bn2; ``shortcut.0`` conv and ``shortcut.1`` BN
    where the shape changes), fc."""

    def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")} | {
            f"{prefix}.num_batches_tracked": ()
        }

    shapes = {"conv1.weight": (64, 3, 3, 3), **bn("bn1", 64)}
    in_planes = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for block in (0, 1):
            p = f"layer{stage}.{block}"
            shapes |= {
                f"{p}.conv1.weight": (planes, in_planes, 3, 3),
                **bn(f"{p}.bn1", planes),
                f"{p}.conv2.weight": (planes, planes, 3, 3),
                **bn(f"{p}.bn2", planes),
            }
            if in_planes != planes:
                shapes |= {f"{p}.shortcut.0.weight": (planes, in_planes, 1, 1), **bn(f"{p}.shortcut.1", planes)}
            in_planes = planes
    return shapes | {"fc.weight": (num_classes, 512), "fc.bias": (num_classes,)}


@pytest.mark.parametrize(
    "backbone, num_classes",
    [("openood_resnet18_32x32.openood_v15_cifar10", 10), ("openood_resnet18_32x32.openood_v15_cifar100", 100)],
)
def test_openood_resnet18_32x32_checkpoint_loads_unchanged(backbone: str, num_classes: int, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    state = {
        k: (
            torch.randint(0, 5, s, generator=gen)
            if k.endswith("num_batches_tracked")
            else torch.rand(s, generator=gen) + 0.5
        )
        for k, s in _openood_resnet18_32x32_shapes(num_classes).items()
    }
    torch.save(state, tmp_path / "best.ckpt")  # as OpenOOD saves it: torch.save(net.state_dict(), ...best.ckpt)
    model = create_backbone(backbone, checkpoint_path=tmp_path / "best.ckpt")
    loaded = model.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    features = model.forward_features(torch.rand(2, 3, 32, 32))
    assert features.shape == (2, 512, 4, 4) and model.forward_head(features).shape == (2, num_classes)
    assert timm.create_model(backbone, features_only=True).feature_info.reduction() == [1, 2, 4, 8]


def test_openood_resnet18_224x224_is_torchvisions_resnet18(tmp_path: Path) -> None:
    """OpenOOD's ResNet18_224x224 subclasses torchvision's ResNet without new modules: its checkpoint is a
    torchvision ResNet-18 state_dict, and the registered model computes the same logits."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=200).eval()
    torch.save(reference.state_dict(), tmp_path / "best.ckpt")
    model = create_backbone("openood_resnet18_224x224.openood_v15_imagenet200", checkpoint_path=tmp_path / "best.ckpt")
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    cfg = timm.models.get_pretrained_cfg("openood_resnet18_224x224.openood_v15_imagenet200")
    assert (cfg.input_size, cfg.crop_pct, cfg.mean) == ((3, 224, 224), 224 / 256, (0.485, 0.456, 0.406))
