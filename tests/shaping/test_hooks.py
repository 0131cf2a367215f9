"""ash_lightning.shaping.hooks: shaping through forward hooks on timm and torchvision models equals shaping by hand."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from torch import nn
from torchvision import models as tv

from ash_lightning.shaping import functional as shaping
from ash_lightning.shaping.hooks import ShapingHandle, attach_shaping, resolve_hook_point
from ash_lightning.shaping.specs import get_shaping

MODELS = {  # name -> input side
    "resnet18": 64,
    "convnext_tiny": 64,
    "efficientnet_b0": 64,
    "vit_small_patch16_224": 224,
}
NEGATIVE_WARNING = "ASH assumes non-negative activations"


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {
        name: (timm.create_model(name, pretrained=False).eval(), torch.randn(2, 3, side, side))
        for name, side in MODELS.items()
    }


@pytest.fixture(autouse=True)
def no_grad():
    shaping._reset_negative_warning()
    with torch.no_grad():
        yield
    shaping._reset_negative_warning()


def shape_quietly(spec, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_shaping(spec)(x)


@pytest.mark.parametrize("spec", ["ash_s@90", "ash_b@65"])
@pytest.mark.parametrize("name", list(MODELS))
def test_penultimate_equals_manual(models, name, spec):
    model, x = models[name]
    base = model(x)
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    expected = model.get_classifier()(shape_quietly(spec, features))
    shaping._reset_negative_warning()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = attach_shaping(model, spec)
        shaped = model(x)
    handle.remove()
    negative_warnings = [w for w in caught if NEGATIVE_WARNING in str(w.message)]
    assert len(negative_warnings) == int(bool((features < 0).any()))
    if name == "vit_small_patch16_224":  # post-LayerNorm tokens
        assert negative_warnings and "% of the values passed to" in str(negative_warnings[0].message)
    assert handle.module is model.get_classifier() and handle.placement == "penultimate"
    assert handle.shaping.spec == spec
    assert not torch.allclose(shaped, base)
    torch.testing.assert_close(shaped, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(model(x), base)


def test_pre_pool_and_module_name_on_resnet18(models):
    model, x = models["resnet18"]
    base = model(x)
    expected = model.forward_head(shape_quietly("ash_s@90", model.forward_features(x)))
    for placement in ("pre_pool", "layer4"):
        with attach_shaping(model, "ash_s@90", placement) as handle:
            shaped = model(x)
        torch.testing.assert_close(shaped, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(model(x), base)
    assert isinstance(handle, ShapingHandle) and handle.module is model.layer4


def test_nested_module_name_shapes_its_output(models):
    model, x = models["convnext_tiny"]
    base = model(x)
    with attach_shaping(model, "react@0.5", "head.fc") as handle:
        clipped = model(x)
    assert handle.module is model.head.fc
    assert torch.equal(clipped, base.clamp(max=0.5))
    assert torch.equal(model(x), base)


def test_resolve_hook_point(models):
    resnet, convnext = models["resnet18"][0], models["convnext_tiny"][0]
    assert resolve_hook_point(resnet, "penultimate") == (resnet.fc, "input")
    assert resolve_hook_point(resnet, "pre_pool") == (resnet.global_pool, "input")
    assert resolve_hook_point(resnet, "layer4") == (resnet.layer4, "output")
    assert resolve_hook_point(convnext, "penultimate") == (convnext.head.fc, "input")
    assert resolve_hook_point(convnext, "pre_pool") == (convnext.head.global_pool, "input")


def test_callable_shaping_and_hooked_model_copies(models):
    model, x = models["resnet18"]
    base = model(x)
    with attach_shaping(model, lambda f: f * 0, "pre_pool"):
        zeroed = model(x)
    torch.testing.assert_close(zeroed, model.fc.bias.expand_as(base))
    handle = attach_shaping(model, "ash_p@90")
    try:
        twin = copy.deepcopy(model)  # what DDP spawn / checkpointing do to a hooked model
    finally:
        handle.remove()
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(twin(x), model.fc(shaping.ash_p(features, 90)))
    assert torch.equal(model(x), base)


def test_bad_placements(models):
    resnet, vit = models["resnet18"][0], models["vit_small_patch16_224"][0]
    unknown = r"Unknown placement 'layer9' for ResNet.*'penultimate', 'pre_pool'.*'layer4'"
    with pytest.raises(ValueError, match=unknown):
        attach_shaping(resnet, "ash_s@90", "layer9")
    with pytest.raises(ValueError, match=r"'pre_pool'.*VisionTransformer has no.*global_pool.*'norm'"):
        attach_shaping(vit, "ash_s@90", "pre_pool")
    headless = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match=r"'penultimate'.*ResNet has no classifier.*Identity.*'global_pool'"):
        attach_shaping(headless, "ash_s@90")
    squeezenet = tv.squeezenet1_1(num_classes=10)  # its classifier is a convolution: no nn.Linear
    with pytest.raises(
        ValueError,
        match=r"'penultimate'.*SqueezeNet has neither get_classifier\(\) \(timm\) nor an "
        r"nn\.Linear.*one of 'classifier\.3'",
    ):
        attach_shaping(squeezenet, "ash_s@90")
    with pytest.raises(ValueError, match=r"'penultimate'.*Sequential has neither.*one of '0', '1'"):
        resolve_hook_point(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()), "penultimate")
    with pytest.raises(ValueError, match="Invalid shaping spec 'ash_x'"):
        attach_shaping(resnet, "ash_x")
    assert not resnet.fc._forward_pre_hooks  # nothing left attached by the failures


def test_module_with_tuple_output():
    lstm = nn.Sequential()
    lstm.add_module("rnn", nn.LSTM(4, 4, batch_first=True))
    with attach_shaping(lstm, "ash_p@50", "rnn"), pytest.raises(ValueError, match=r"'rnn' \(LSTM\) outputs a tuple"):
        lstm(torch.rand(2, 3, 4))


TORCHVISION = {  # name -> (builder with random weights, the classifier that "penultimate" must resolve to)
    "resnet18": (lambda: tv.resnet18(num_classes=10), "fc"),
    "densenet": (
        lambda: tv.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, num_classes=10),
        "classifier",
    ),
    "mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=10), "classifier.3"),
    "efficientnet_b0": (lambda: tv.efficientnet_b0(num_classes=10), "classifier.1"),
    "convnext_tiny": (lambda: tv.convnext_tiny(num_classes=10), "classifier.2"),
    "vgg11": (lambda: tv.vgg11(num_classes=10), "classifier.6"),
    "vit": (
        lambda: tv.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
        ),
        "heads.head",
    ),
}


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_penultimate_is_the_input_of_the_last_linear(name):
    build, classifier_name = TORCHVISION[name]
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(2, 3, 32, 32)
    classifier = model.get_submodule(classifier_name)
    nn.init.normal_(classifier.weight)  # torchvision starts some heads at zero (ViT): make the logits tell apart
    assert resolve_hook_point(model, "penultimate") == (classifier, "input")
    features_of = copy.deepcopy(model)  # the same network with its classifier removed outputs the features
    features_of.set_submodule(classifier_name, nn.Identity())
    features = features_of(x)
    assert features.shape == (2, classifier.in_features)
    for spec in ("ash_s@90", "react@0.1", "scale@85"):
        expected = classifier(shape_quietly(spec, features))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with attach_shaping(model, spec) as handle:
                shaped = model(x)
        assert handle.module is classifier
        scale = float(expected.abs().max())  # random-weight nets differ widely in logit magnitude
        torch.testing.assert_close(shaped, expected, rtol=1e-5, atol=1e-5 * scale)
        assert spec != "ash_s@90" or not torch.allclose(shaped, classifier(features), rtol=0, atol=1e-2 * scale)
    assert torch.equal(model(x), classifier(features))
