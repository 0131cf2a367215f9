"""RankFeat (``rankfeat``) equals OpenOOD's ``openood/postprocessors/rankfeat_postprocessor.py`` on hand-made tensors
and on the project's ResNets (block 3/block 4 = the last stage's input/output), in a sweep with one backbone pass per
batch, and through the callbacks; unusable backbones and the feature cache are refused in one line; main.py runs it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as lp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ash_lightning.callbacks import ActivationShapingCallback, OODMetricsCallback
from ash_lightning.data import OODDataModule
from ash_lightning.errors import UserError
from ash_lightning.evaluation.score_store import load_scores
from ash_lightning.models.backbone import create_backbone
from ash_lightning.module import OODEvalModule
from ash_lightning.shaping.hooks import attach_shaping
from ash_lightning.shaping.rankfeat import rank1_removed
from ash_lightning.shaping.specs import get_shaping, list_shapings
from tests.conftest import main_in_process, tiny_config


# --- Transcription of OpenOOD v1.5 openood/postprocessors/rankfeat_postprocessor.py (the reference) ---------------
def _l2normalize(v, eps=1e-10):
    return v / (torch.norm(v, dim=2, keepdim=True) + eps)


def power_iteration(A, iter=20):  # noqa: A002  (OpenOOD's names)
    u = torch.FloatTensor(1, A.size(1)).normal_(0, 1).view(1, 1, A.size(1)).repeat(A.size(0), 1, 1).to(A)
    v = torch.FloatTensor(A.size(2), 1).normal_(0, 1).view(1, A.size(2), 1).repeat(A.size(0), 1, 1).to(A)
    for _ in range(iter):
        v = _l2normalize(u.bmm(A)).transpose(1, 2)
        u = _l2normalize(A.bmm(v).transpose(1, 2))
    sigma = u.bmm(A).bmm(v)
    sub = sigma * u.transpose(1, 2).bmm(v.transpose(1, 2))
    return sub


@torch.no_grad()
def postprocess(net, inputs, accelerate=False, temperature=1):
    """``RankFeatPostprocessor.postprocess`` with ``postprocessor_args`` as arguments; also returns the logits."""
    feat1 = net.intermediate_forward(inputs, layer_index=4)
    B, C, H, W = feat1.size()
    feat1 = feat1.view(B, C, H * W)
    if accelerate:
        feat1 = feat1 - power_iteration(feat1, iter=20)
    else:
        u, s, v = torch.linalg.svd(feat1, full_matrices=False)
        feat1 = feat1 - s[:, 0:1].unsqueeze(2) * u[:, :, 0:1].bmm(v[:, 0:1, :])
    feat1 = feat1.view(B, C, H, W)
    logits1 = net.fc(torch.flatten(net.avgpool(feat1), 1))

    feat2 = net.intermediate_forward(inputs, layer_index=3)
    B, C, H, W = feat2.size()
    feat2 = feat2.view(B, C, H * W)
    if accelerate:
        feat2 = feat2 - power_iteration(feat2, iter=20)
    else:
        u, s, v = torch.linalg.svd(feat2, full_matrices=False)
        feat2 = feat2 - s[:, 0:1].unsqueeze(2) * u[:, :, 0:1].bmm(v[:, 0:1, :])
    feat2 = feat2.view(B, C, H, W)
    feat2 = net.layer4(feat2)
    logits2 = net.fc(torch.flatten(net.avgpool(feat2), 1))

    logits = (logits1 + logits2) / 2
    conf = temperature * torch.logsumexp(logits / temperature, dim=1)
    _, pred = torch.max(logits, dim=1)
    return pred, conf, logits


# ------------------------------------------------------------------------------------------------------------------


class TinyResNet(nn.Module):
    """OpenOOD's ResNet interface (``intermediate_forward``, ``layer4``, ``avgpool``, ``fc``) on a tiny network with
    known stages layer1..layer4: 8×8 inputs give block 3 maps of 10 × 16 and block 4 maps of 12 × 4."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(8, 10, 3, padding=1), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(10, 12, 3, stride=2, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def intermediate_forward(self, x: Tensor, layer_index: int) -> Tensor:
        out = F.relu(self.conv1(x))
        for index in range(1, layer_index + 1):
            out = getattr(self, f"layer{index}")(out)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.intermediate_forward(x, 4)), 1))


class OpenOODView:
    """A project backbone through OpenOOD's ResNet interface, blocks 3 and 4 being the named stages' outputs."""

    def __init__(self, model: nn.Module, block3: str, block4: str) -> None:
        self.model, self.blocks = model, {3: block3, 4: block4}
        self.layer4, self.avgpool = model.get_submodule(block4), model.global_pool
        self.fc = model.get_classifier()

    def intermediate_forward(self, x: Tensor, layer_index: int) -> Tensor:
        seen: list[Tensor] = []
        stage = self.model.get_submodule(self.blocks[layer_index])
        handle = stage.register_forward_hook(lambda m, args, out: seen.append(out))
        with handle:
            self.model(x)
        return seen[0]


def _shaped(model: nn.Module, spec: str, x: Tensor, seed: int = 0) -> Tensor:
    torch.manual_seed(seed)
    with torch.no_grad(), attach_shaping(model, spec):
        return model(x)


@pytest.mark.parametrize("accelerate", [False, True])
def test_rankfeat_equals_openood_on_hand_made_tensors(accelerate: bool) -> None:
    net, spec = TinyResNet().eval(), "rankfeat@20" if accelerate else "rankfeat"
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    logits = _shaped(net, spec, x, seed=3)
    torch.manual_seed(3)  # the power iteration's start vectors, drawn in the same order (block 4, then block 3)
    pred, conf, want = postprocess(net, x, accelerate=accelerate)
    torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.logsumexp(logits, 1), conf, rtol=1e-6, atol=1e-6)  # score energy, T = 1
    assert torch.equal(logits.argmax(1), pred)
    assert not torch.allclose(logits, net(x), atol=1e-3)  # detached again, and it changed something
    # one map by hand: rank 1 removed leaves the other singular values
    maps = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(2))
    s_before = torch.linalg.svdvals(maps.view(2, 5, 12))
    torch.testing.assert_close(torch.linalg.svdvals(rank1_removed(maps).view(2, 5, 12))[:, :-1], s_before[:, 1:])


@pytest.mark.parametrize(
    "backbone, block3, block4, size",
    [
        ("cifar_resnet20", "layer2", "layer3", 16),  # three stages: blocks 3/4 are layer2/layer3
        ("openood_resnet18_32x32", "layer3", "layer4", 16),
        ("resnet18", "layer3", "layer4", 64),  # timm: layer4 maps are 2 x 2 at 64 px
    ],
)
def test_blocks_3_and_4_are_the_last_stages_input_and_output(
    backbone: str, block3: str, block4: str, size: int
) -> None:
    torch.manual_seed(0)
    model = create_backbone(backbone)
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(4))
    _, conf, want = postprocess(OpenOODView(model, block3, block4), x)
    logits = _shaped(model, "rankfeat", x)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.logsumexp(logits, 1), conf, rtol=1e-5, atol=1e-5)


def test_rankfeat_spec_and_listing() -> None:
    assert (get_shaping("rankfeat").spec, get_shaping("rankfeat@0").spec, get_shaping("rankfeat@20").spec) == (
        "rankfeat",
        "rankfeat",
        "rankfeat@20",
    )
    for spec, reason in [
        ("rankfeat@-1", "not a step count"),
        ("rankfeat@2.5", "iterations"),
        ("rankfeat@1@2", "0 to 1"),
    ]:
        with pytest.raises(ValueError, match=rf"Invalid shaping spec '{spec}': .*{reason}"):
            get_shaping(spec)
    entry = {e.name: e for e in list_shapings()}["rankfeat"]
    assert entry.form == "rankfeat[@<iterations>=0]"
    for part in ("Song, Sebe & Wang", "NeurIPS 2022", "s₁u₁v₁ᵀ", "averaged", "rankfeat_postprocessor.py"):
        assert part in entry.description


class FlatStages(nn.Module):
    """Stages named like a ResNet's whose maps are 3-D (B, C, L)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1, self.layer2 = nn.Conv1d(2, 4, 3, padding=1), nn.Conv1d(4, 4, 3, padding=1)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d((None, 1)), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.layer2(self.layer1(x))), 1))


def test_unusable_backbones_and_the_feature_cache_are_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^model\.shaping: rankfeat removes .* VisionTransformer has no ResNet stages"):
        OODEvalModule("test_vit", shaping=["none", "rankfeat"])
    with pytest.raises(ValueError, match=r"global pooling is SelectAdaptivePool2d \(pool_type 'max'\), not an average"):
        attach_shaping(_max_pooled(), "rankfeat")
    with pytest.raises(UserError, match=r"^model\.shaping: rankfeat re-runs the last stage .* Fix: remove model\.feat"):
        OODEvalModule("cifar_resnet20", shaping=["none", "rankfeat"], feature_cache=str(tmp_path))
    callback = ActivationShapingCallback(["none", "rankfeat"])
    trainer = SimpleNamespace(datamodule=None)
    with pytest.raises(UserError, match=r"^ActivationShapingCallback: rankfeat removes .* Sequential has no ResNet"):
        callback.on_test_start(trainer, Holder())
    flat, shape = FlatStages(), r"\(B, C, H, W\), but the last stage's input has shape \(2, 4, 5\)\. Fix:"
    with attach_shaping(flat, "rankfeat"), pytest.raises(UserError, match=rf"^rankfeat removes .* maps {shape}"):
        flat(torch.rand(2, 2, 5))


class Holder(lp.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 2))


def _max_pooled() -> nn.Module:
    torch.manual_seed(0)
    model = create_backbone("cifar_resnet20")
    model.reset_classifier(10, global_pool="max")
    return model


# one of each kind next to rankfeat (every shaping, calibrated ones too, in tests/shaping/test_calibration.py's main.py
# sweep): an activation shaper, a logit shaper (penultimate only)
GRID = ["none", "ash_s@90", "lts@90"]


@pytest.mark.parametrize("placement", ["penultimate", "pre_pool"])
def test_a_sweep_runs_the_backbone_once_to_block_3_and_each_setting_equals_it_alone(
    tiny_checkpoint: Path, placement: str
) -> None:
    shapings = [*GRID, "rankfeat", "rankfeat@20"]
    if placement == "pre_pool":
        shapings.remove("lts@90")  # a logit shaper: penultimate only
    kwargs = {"checkpoint_path": str(tiny_checkpoint), "placement": placement, "score": ["energy", "max_logit"]}
    grid = OODEvalModule("cifar_resnet20", shaping=shapings, **kwargs)
    stem, last = [0], [0]
    grid.model.conv1.register_forward_hook(lambda *_: stem.__setitem__(0, stem[0] + 1))
    grid.model.layer3[0].register_forward_hook(lambda *_: last.__setitem__(0, last[0] + 1))
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.rand(5, 3, 16, 16, generator=generator), torch.zeros(5).long(), torch.arange(5)) for _ in "ab"]
    outputs = []
    for b, batch in enumerate(batches):
        before = last[0]
        torch.manual_seed(b)
        outputs.append(grid.test_step(batch, b))
        assert stem[0] == b + 1  # one backbone pass per batch up to block 3, for every setting
        if b:
            assert last[0] - before == 3  # the last stage: once for all settings, once more per rankfeat setting
    for s, spec in enumerate(shapings):
        alone = OODEvalModule("cifar_resnet20", shaping=spec, **kwargs)
        for b, (batch, out) in enumerate(zip(batches, outputs, strict=True)):
            torch.manual_seed(b)
            single = alone.test_step(batch, 0)
            torch.testing.assert_close(out["logits"][:, s], single["logits"], rtol=0, atol=1e-5)
            torch.testing.assert_close(out["scores"][:, 2 * s : 2 * s + 2], single["scores"], rtol=0, atol=1e-5)


class Plain(lp.LightningModule):
    """A user's module around a CIFAR ResNet: test_step returns its logits."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__()
        self.net = create_backbone("cifar_resnet20", checkpoint_path=str(checkpoint))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(batch[0])


def _images(n: int, seed: int, shift: float = 0.0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, 16, 16, generator=generator) + shift, torch.zeros(n, dtype=torch.long))


def test_the_callbacks_attach_rankfeat_or_sweep_it_and_match_openood(tiny_checkpoint: Path, tmp_path: Path) -> None:
    id_set, far = _images(12, 0), _images(9, 1, 0.5)
    stores = {}
    for name, spec in (("alone", "rankfeat"), ("sweep", ["none", "rankfeat"])):
        metrics = OODMetricsCallback(
            ood={"far": far}, batch_size=5, output_dir=str(tmp_path / name), log_figures=False, verbose=False
        )
        trainer = lp.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[ActivationShapingCallback(spec), metrics],
        )
        trainer.test(Plain(tiny_checkpoint), DataLoader(id_set, batch_size=5), verbose=False)
        stores[name], _ = load_scores(str(tmp_path / name))
        assert [run["shaping"] for run in metrics.results["runs"]] == ([spec] if name == "alone" else spec)
    model = create_backbone("cifar_resnet20", checkpoint_path=str(tiny_checkpoint))
    for part, data in (("id", id_set), ("far", far)):
        _, conf, _ = postprocess(OpenOODView(model, "layer2", "layer3"), data.tensors[0])
        np.testing.assert_allclose(stores["alone"][part]["scores"][:, 0], conf.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stores["sweep"][part]["scores"][:, 1], conf.numpy(), rtol=1e-5, atol=1e-5)


def test_main_py_runs_rankfeat_alone_and_scores_as_openood(
    tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    config = tiny_config(tiny_data, tiny_checkpoint, tmp_path / "out", shaping="rankfeat")
    config["data"]["id"]["limit"] = 40
    config["data"]["ood"] = {"dark": {**config["data"]["ood"]["dark"], "limit": 20}}
    config["data"]["groups"] = {"far": ["dark"]}
    status, _, err = main_in_process(config, tmp_path)
    assert status == 0, err[-3000:]
    store, _ = load_scores(str(tmp_path / "out" / "run" / "v"))
    datamodule = OODDataModule(id=config["data"]["id"], ood=config["data"]["ood"], backbone="cifar_resnet20")
    datamodule.setup("test")
    images, index = zip(*((x, i) for x, _, i in datamodule.test_dataloader()[0]), strict=True)
    model = create_backbone("cifar_resnet20", checkpoint_path=str(tiny_checkpoint))
    _, conf, _ = postprocess(OpenOODView(model, "layer2", "layer3"), torch.cat(images))
    order = np.argsort(store["id"]["index"])
    assert np.array_equal(store["id"]["index"][order], torch.cat(index).numpy())
    np.testing.assert_allclose(store["id"]["scores"][order].ravel(), conf.numpy(), rtol=1e-5, atol=1e-5)


def test_svd_on_the_cpu_runs_on_one_thread_and_restores_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batched CPU SVD is many times slower on several threads (see ``_one_thread_on_cpu``): it runs on one, the
    caller's thread count comes back, and the result is the plain SVD's."""
    from ash_lightning.shaping import rankfeat

    seen: list[int] = []
    plain_svd = torch.linalg.svd

    def svd(a: torch.Tensor, full_matrices: bool = True):
        seen.append(torch.get_num_threads())
        return plain_svd(a, full_matrices=full_matrices)

    a = torch.rand(6, 8, 5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(torch.linalg, "svd", svd)
        top = rankfeat.svd_top(a)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    u, s, vh = plain_svd(a, full_matrices=False)
    torch.testing.assert_close(top, s[:, :1, None] * (u[:, :, :1] @ vh[:, :1, :]), rtol=0, atol=1e-6)
