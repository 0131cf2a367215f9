"""Option checks where each option is parsed (``ash_lightning._options`` and its callers): every value out of range
is one UserError naming the key, the bad value, the valid range and a fix. In process and fast; a few of these
cases also run end to end through ``main.py`` (tests/cli/test_errors_input.py), as do ``report``'s ``--tpr`` and
``--convention``."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ash_lightning._options import (
    CONVENTIONS,
    check_choice,
    check_convention,
    check_int,
    check_range,
    check_tpr,
)
from ash_lightning.callbacks import OODMetricsCallback
from ash_lightning.data import OODDataModule
from ash_lightning.data.sources import build_source
from ash_lightning.errors import UserError
from ash_lightning.evaluation.metrics import OODMetrics, ood_metrics
from ash_lightning.module import OODEvalModule

NOISE = {"kind": "gaussian", "num_samples": 4, "size": 8}


def _data(**options: object) -> OODDataModule:
    """A data module whose transform comes from a backbone's config, so only the option under test can fail."""
    return OODDataModule(
        id=NOISE, ood={"bright": {**NOISE, "kind": "uniform"}}, **{"backbone": "cifar_resnet20", **options}
    )


def _model(**options: object) -> OODEvalModule:
    return OODEvalModule("cifar_resnet20", **options)


# (case, the call that parses the option, fragments of its one message: the key and value, the range, the fix)
OPTION_ERRORS: list[tuple[str, Callable[[], object], tuple[str, ...]]] = [
    (
        "batch_size_zero",
        lambda: _data(batch_size=0),
        ("data.batch_size: 0", "integer >= 1", "Fix: set data.batch_size: 64"),
    ),
    ("batch_size_negative", lambda: _data(batch_size=-4), ("data.batch_size: -4", "integer >= 1")),
    ("batch_size_fraction", lambda: _data(batch_size=2.5), ("data.batch_size: 2.5", "integer >= 1")),
    (
        "num_workers_negative",
        lambda: _data(num_workers=-1),
        ("data.num_workers: -1", "integer >= 0", "set data.num_workers: 4"),
    ),
    ("image_size_zero", lambda: _data(image_size=0), ("data.image_size: 0", "integer >= 1")),
    ("crop_pct_zero", lambda: _data(crop_pct=0.0), ("data.crop_pct: 0.0", "(0, 1]", "Fix: set data.crop_pct: 0.875")),
    ("crop_pct_above_one", lambda: _data(crop_pct=1.5), ("data.crop_pct: 1.5", "(0, 1]")),
    ("std_zero", lambda: _data(std=(0.2, 0.0, 0.2)), ("data.std: 0.0", "(0, inf)")),
    (
        "unknown_interpolation",
        lambda: _data(interpolation="cubic"),
        ("data.interpolation: 'cubic'", "'bicubic'", "Fix:"),
    ),
    (
        "negative_calibration_samples",
        lambda: _model(calibration_samples=-5),
        ("model.calibration_samples: -5", "integer >= 1"),
    ),
    ("num_classes_zero", lambda: _model(num_classes=0), ("model.num_classes: 0", "integer >= 1")),
    (
        "feature_cache_max_gib_zero",
        lambda: _model(feature_cache="unused", feature_cache_max_gib=0),
        ("model.feature_cache_max_gib: 0", "(0, inf)"),
    ),
    (
        "tpr_above_one",
        lambda: OODMetricsCallback(tpr=1.5),
        ("ood_metrics.tpr: 1.5", "(0, 1]", "Fix: set ood_metrics.tpr: 0.95"),
    ),
    ("tpr_zero", lambda: OODMetricsCallback(tpr=0.0), ("ood_metrics.tpr: 0.0", "(0, 1]")),
    ("tpr_not_a_number", lambda: OODMetricsCallback(tpr=float("nan")), ("ood_metrics.tpr: nan", "(0, 1]")),
    (
        "unknown_convention",
        lambda: OODMetricsCallback(convention="sklearn"),
        ("ood_metrics.convention: 'sklearn'", "'paper', 'openood'"),
    ),
    (
        "unknown_nonfinite_policy",
        lambda: OODMetricsCallback(nonfinite="ignore"),
        ("nonfinite='ignore'", "'raise', 'drop'"),
    ),
    (
        "negative_noise_size",
        lambda: build_source({"kind": "gaussian", "size": -8}, "data.ood.bright"),
        ("data.ood.bright.size: -8", "integer >= 1"),
    ),
    (
        "zero_noise_samples",
        lambda: build_source({"kind": "gaussian", "num_samples": 0}, "data.ood.bright"),
        ("data.ood.bright.num_samples: 0", "integer >= 1"),
    ),
    (
        "negative_limit",
        lambda: build_source({**NOISE, "limit": -3}, "data.ood.bright"),
        ("data.ood.bright.limit: -3", "integer >= 1"),
    ),
    (
        "zero_slice_step",
        lambda: build_source({**NOISE, "select": "::0"}, "data.ood.bright"),
        ("data.ood.bright", "'::0' is not a slice", "non-zero step"),
    ),
    ("metric_tpr", lambda: ood_metrics([1.0], [0.0], tpr=95), ("tpr: 95", "(0, 1]", "Fix: set tpr: 0.95")),
    ("metric_convention", lambda: OODMetrics(convention="OpenOOD"), ("convention: 'OpenOOD'", "'paper', 'openood'")),
    (
        "unknown_shaping",
        lambda: _model(shaping="ash_q@90"),
        ("model.shaping", "unknown shaping name 'ash_q'", "Valid forms"),
    ),
    ("unknown_score", lambda: _model(score="entropy_plus"), ("model.score", "'entropy_plus'", "Valid forms")),
    (
        "percentile_out_of_range",
        lambda: _model(shaping="ash_s@100"),
        ("model.shaping", "outside the valid range [0, 100)", "e.g. percentile=90"),
    ),
]


@pytest.mark.parametrize("parse, fragments", [c[1:] for c in OPTION_ERRORS], ids=[c[0] for c in OPTION_ERRORS])
@pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")
def test_an_option_out_of_range_is_one_user_error_naming_key_value_range_and_fix(
    parse: Callable[[], object], fragments: tuple[str, ...]
) -> None:
    with pytest.raises(UserError) as info:
        parse()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_the_checks_return_the_value_in_range_and_take_the_example_by_keyword() -> None:
    assert check_int("k", 0, 0, example=4) == 0 and isinstance(check_int("k", 3.0, 1, example=4), int)
    assert check_range("k", 1, 0, 1, low_open=True, high_open=False, example=0.5) == 1.0
    assert check_tpr("tpr", 1) == 1.0 and check_tpr("tpr", 0.95) == 0.95
    assert check_convention("convention", "openood") == "openood" and CONVENTIONS == ("paper", "openood")
    assert check_choice("k", "b", ("a", "b")) == "b"
    with pytest.raises(TypeError):
        check_int("k", 1, 0, 4)  # type: ignore[misc]  # the example is keyword-only: 4 is no upper bound
    for bad in (True, "3", None, 2.5, -1):
        with pytest.raises(UserError, match=r"^k: .* is out of range; valid: an integer >= 0\. Fix: set k: 4\.$"):
            check_int("k", bad, 0, example=4)
    with pytest.raises(UserError, match=r"^k: inf is out of range; valid: a number in \[0, 1\]"):
        check_range("k", float("inf"), 0, 1, low_open=False, high_open=False, example=0.5)
