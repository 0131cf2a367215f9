"""ash_lightning.shaping.functional: equivalence with the authors' ASH, purity, numerics, warnings and spec strings."""

from __future__ import annotations

import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor

from ash_lightning._registry import Registry
from ash_lightning.shaping import functional as shaping
from ash_lightning.shaping import specs as shaping_specs
from ash_lightning.shaping.functional import ash_b, ash_p, ash_rand, ash_s, react, react_and_ash, scale
from ash_lightning.shaping.specs import Shaper, get_shaping, register_shaping

LAYOUTS = [(6, 40), (3, 8, 5, 5), (4, 9, 12)]
ASH = {"ash_p": ash_p, "ash_b": ash_b, "ash_s": ash_s}
ALL = [ash_p, ash_b, ash_s, ash_rand, scale]


def reference(x: Tensor, variant: str, percentile: float) -> Tensor:
    """The authors' in-place ASH, generalised to a (B, n) view, applied to a clone of ``x``."""
    x = x.clone()
    b = x.shape[0]
    t = x.view(b, -1)
    n = t.shape[1]
    k = n - int(np.round(n * percentile / 100.0))
    s1 = t.sum(dim=1)
    v, i = torch.topk(t, k, dim=1)
    if variant == "ash_b":
        t.zero_().scatter_(dim=1, index=i, src=torch.ones_like(v) * (s1 / k)[:, None])
        return x
    t.zero_().scatter_(dim=1, index=i, src=v)
    if variant == "ash_s":
        s2 = t.sum(dim=1)
        return x * torch.exp(s1 / s2).view(b, *[1] * (x.dim() - 1))
    return x


def keep_count(n: int, percentile: float) -> int:
    return n - int(np.round(n * percentile / 100.0))


def make_input(shape: tuple[int, ...], ties: bool) -> Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randint(0, 4, shape, generator=g).float() if ties else torch.randn(shape, generator=g).relu()
    x[1] = 0  # an all-zero sample
    return x


@pytest.fixture(autouse=True)
def quiet_negative_warning():
    """Each test starts with the once-per-process warning re-armed."""
    shaping._reset_negative_warning()
    yield
    shaping._reset_negative_warning()


@pytest.mark.parametrize("shape", LAYOUTS)
@pytest.mark.parametrize("ties", [False, True], ids=["randn", "ties"])
@pytest.mark.parametrize("percentile", [65, 90])
@pytest.mark.parametrize("variant", list(ASH))
def test_matches_reference(shape, ties, percentile, variant):
    x = make_input(shape, ties)
    original = x.clone()
    out = ASH[variant](x, percentile)
    expected = reference(x, variant, percentile)
    zero_rows = (x.flatten(1) == 0).all(1)
    assert torch.isnan(expected[zero_rows]).all() == (variant == "ash_s")  # the reference's 0/0
    expected[zero_rows] = 0
    assert torch.equal(x, original)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # the survivors sit exactly where the reference puts them: k per non-zero sample
    assert torch.equal(out != 0, expected != 0)
    if variant == "ash_b":
        k = keep_count(x[0].numel(), percentile)
        counts = (out.flatten(1) != 0).sum(1)
        assert (counts[~zero_rows] == k).all() and (counts[zero_rows] == 0).all()


@pytest.mark.parametrize("shape", LAYOUTS)
def test_ash_rand_keeps_topk_positions(shape):
    x = make_input(shape, ties=True)
    original = x.clone()
    out = ash_rand(x, 65, low=2.0, high=3.0, generator=torch.Generator().manual_seed(0))
    again = ash_rand(x, 65, low=2.0, high=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, original) and torch.equal(out, again)
    survivors = reference(x, "ash_p", 65) != 0
    survivors[1] = reference(torch.ones_like(x), "ash_p", 65)[1] != 0  # the all-zero sample keeps k too
    assert torch.equal(out != 0, survivors)
    assert ((out[survivors] >= 2.0) & (out[survivors] < 3.0)).all()


def test_scale_react_and_react_and_ash():
    x = torch.randn(4, 50).relu()
    top = x.topk(keep_count(50, 85), dim=1).values.sum(1)
    torch.testing.assert_close(scale(x), x * torch.exp(x.sum(1) / top)[:, None])
    assert torch.equal(react(x, 0.5), torch.minimum(x, torch.tensor(0.5)))
    torch.testing.assert_close(react_and_ash(x, 0.5, 90), reference(x.clamp(max=0.5), "ash_s", 90))


@pytest.mark.parametrize("fn", ALL + [react_and_ash], ids=lambda f: f.__name__)
def test_edge_samples_are_finite(fn):
    shaper = (lambda x: fn(x, 1.0, 90)) if fn is react_and_ash else (lambda x: fn(x, 90))
    cases = {
        "zeros": torch.zeros(3, 10),
        "constant": torch.full((3, 10), 2.5),
        "all_negative": -torch.rand(3, 10) - 0.1,
        "tiny_negative": torch.tensor([[-1e-30] * 9 + [-1.0]]),
        "single_element": torch.rand(3, 1),
        "batch_of_one": torch.rand(1, 2, 3, 3),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = {name: shaper(x) for name, x in cases.items()}
    for name, out in results.items():
        assert torch.isfinite(out).all(), name
    if fn is not ash_rand:  # ASH-rand draws its k survivors whatever their values, as in the paper
        assert torch.equal(results["zeros"], cases["zeros"])


def test_single_element_sample_keeps_its_element():
    x = torch.rand(3, 1) + 0.5
    assert torch.equal(ash_p(x, 99), x)
    torch.testing.assert_close(ash_s(x, 99), x * torch.e)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn", [ash_p, ash_b, ash_s, scale], ids=lambda f: f.__name__)
def test_half_precision_matches_float32(dtype, fn):
    x = (torch.randn(4, 8, 6, 6).relu() * 30).to(dtype)
    out, out32 = fn(x, 90), fn(x.float(), 90)
    assert out.dtype == dtype and torch.isfinite(out32).all() and torch.isfinite(out).all()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), out32.to(dtype).float(), rtol=2 * eps, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_ash_rand(dtype):
    x = (torch.randn(4, 8, 6, 6).relu() * 30).to(dtype)
    out = ash_rand(x, 90, low=1.0, high=2.0)
    assert out.dtype == dtype
    assert torch.equal(out != 0, ash_p(x.float(), 90) != 0)
    assert ((out[out != 0] >= 1.0) & (out[out != 0] <= 2.0)).all()


@pytest.mark.parametrize("fn", [ash_b, ash_s, scale], ids=lambda f: f.__name__)
def test_large_float16_activations_saturate(fn):
    x = torch.full((2, 4000), 1000.0, dtype=torch.float16)  # the sum (4e6) overflows float16
    out = fn(x, 90)
    assert torch.isfinite(out).all()
    if fn is ash_b:  # s1 / k = 4e6 / 400 = 10000, computed without the float16 overflow
        assert out.max().item() == 10000.0
    else:  # 1000 * exp(10) or 1000 * exp(1.1) both exceed 65504: saturated
        assert out.max().item() == torch.finfo(torch.float16).max


@pytest.mark.parametrize("percentile", [-1, 100, 150, float("nan")])
@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
def test_bad_percentile(fn, percentile):
    with pytest.raises(ValueError, match=r"percentile=.*valid range \[0, 100\)"):
        fn(torch.rand(2, 10), percentile)


def test_bad_input():
    with pytest.raises(ValueError, match="floating-point"):
        ash_s(torch.ones(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"at least 2 dims.*x\[:, None\]"):
        ash_s(torch.ones(10))


def test_negative_values_warn_once():
    x = torch.tensor([[1.0, -1.0, 2.0, -2.0]] * 2)
    with pytest.warns(UserWarning, match=r"50\.0% of the values passed to ash_s are negative"):
        ash_s(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ash_b(x)
        scale(x)
    assert not caught


def test_non_negative_values_do_not_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ash_s(torch.rand(2, 10))
        react(-torch.rand(2, 10), 0.5)  # ReAct alone makes no non-negativity assumption
    assert not caught
    with pytest.warns(UserWarning, match=r"25\.0% of the values passed to react_and_ash"):
        react_and_ash(torch.tensor([[1.0, 2.0, 3.0, -1.0]]), 1.0, 50)


@pytest.mark.parametrize(
    "spec, normalised, params, percentile, fn",
    [
        ("none", "none", (), None, lambda x: x),
        ("ash_p@90", "ash_p@90", (90.0,), 90.0, lambda x: ash_p(x, 90)),
        ("ash_b", "ash_b@65", (65.0,), 65.0, lambda x: ash_b(x, 65)),
        ("ash_s@90.0", "ash_s@90", (90.0,), 90.0, lambda x: ash_s(x, 90)),
        ("ash_s@97.5", "ash_s@97.5", (97.5,), 97.5, lambda x: ash_s(x, 97.5)),
        ("ash_rand@65", "ash_rand@65", (65.0,), 65.0, None),
        ("react@1.0", "react@1", (1.0,), None, lambda x: react(x, 1.0)),
        ("react_and_ash@1.0@90", "react_and_ash@1@90", (1.0, 90.0), 90.0, lambda x: react_and_ash(x, 1.0, 90)),
        ("scale", "scale@85", (85.0,), 85.0, lambda x: scale(x, 85)),
        ("scale@80", "scale@80", (80.0,), 80.0, lambda x: scale(x, 80)),
    ],
)
def test_get_shaping(spec, normalised, params, percentile, fn):
    shaper = get_shaping(spec)
    assert isinstance(shaper, Shaper)
    assert (shaper.spec, shaper.name, shaper.params, shaper.percentile) == (
        normalised,
        normalised.split("@")[0],
        params,
        percentile,
    )
    assert get_shaping(shaper) is shaper
    assert get_shaping(shaper.spec).spec == normalised
    x = torch.rand(3, 4, 5)
    if fn is None:
        assert torch.equal(shaper(x) != 0, ash_p(x, 65) != 0)
    else:
        assert torch.equal(shaper(x), fn(x))
    clone = pickle.loads(pickle.dumps(shaper))
    assert clone.spec == normalised and (fn is None or torch.equal(clone(x), fn(x)))


def test_get_shaping_wraps_plain_callables():
    def halve(x: Tensor) -> Tensor:
        return x / 2

    shaper = get_shaping(halve)
    assert (shaper.spec, shaper.name, shaper.params, shaper.percentile) == ("halve", "halve", (), None)
    assert torch.equal(shaper(torch.ones(2, 2)), torch.full((2, 2), 0.5))
    with pytest.raises(TypeError, match="spec string or a callable"):
        get_shaping(90)


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("ash", "unknown shaping name 'ash'"),
        ("ASH_S@90", "unknown shaping name 'ASH_S'"),
        ("ash_s@90@1", r"ash_s takes 0 to 1 parameter\(s\), got 2"),
        ("react", "react takes 1 parameter"),
        ("react_and_ash@1.0", "react_and_ash takes 2 parameter"),
        ("none@3", "none takes 0 parameter"),
        ("ash_s@abc", "<percentile> must be a number, got 'abc'"),
        ("react@", "<threshold> must be a number, got ''"),
        ("ash_b@100", r"percentile=100.0 is outside the valid range \[0, 100\)"),
    ],
)
def test_malformed_spec_lists_valid_forms(spec, reason):
    with pytest.raises(ValueError, match=re.escape(f"Invalid shaping spec {spec!r}")) as info:
        get_shaping(spec)
    message = str(info.value)
    assert re.search(reason, message)
    for form in (
        "none",
        "ash_p[@<percentile>=65]",
        "ash_s[@<percentile>=65]",
        "ash_rand[@<percentile>=65]",
        "react@<threshold>",
        "react_and_ash@<threshold>@<percentile>",
        "scale[@<percentile>=85]",
    ):
        assert form in message


class _Clip:
    """A custom factory parsing its own string args, e.g. 'clip@p90' or 'clip@2'."""

    def __call__(self, arg: str) -> Shaper:
        if arg.startswith("p"):
            raise ValueError("clip@p<percentile> needs calibration first")
        return Shaper(lambda x: x.clamp(max=float(arg)), f"clip@{arg}", (float(arg),))


def _halve():
    """Halve every activation (a factory returning a plain callable). Its first sentence describes it."""
    return lambda x: x / 2


def test_register_shaping(monkeypatch):
    registry = Registry("shaping")
    for entry in shaping_specs.SHAPINGS.entries():
        registry.register(entry.name, entry.form, description=entry.description)(entry.target)
    monkeypatch.setattr(shaping_specs, "SHAPINGS", registry)
    register_shaping("clip", "clip@<threshold>|clip@p<percentile>")(_Clip())
    register_shaping("halve", "halve")(_halve)
    assert get_shaping("clip@2").params == (2.0,)
    assert torch.equal(get_shaping("clip@2")(torch.tensor([[1.0, 3.0]])), torch.tensor([[1.0, 2.0]]))
    wrapped = get_shaping("halve")
    assert isinstance(wrapped, Shaper) and wrapped.spec == "halve"
    with pytest.raises(ValueError, match=r"needs calibration first\. Valid forms: .*clip@p<percentile>"):
        get_shaping("clip@p90")
    with pytest.raises(ValueError, match="already registered.*replace=True"):
        register_shaping("ash_s", "ash_s@<x>")
    register_shaping("ash_s", "ash_s@<x>", replace=True)(_Clip())
    assert get_shaping("ash_s@3").spec == "clip@3"
    with pytest.raises(ValueError, match="must not contain '@'"):
        register_shaping("a@b", "a@b")
    assert [e.name for e in shaping_specs.list_shapings()][-2:] == ["clip", "halve"]
    assert (
        shaping_specs.list_shapings()[-1].description == "Halve every activation (a factory returning a plain callable)"
    )
