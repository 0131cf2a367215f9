"""ReAct at a threshold t <= 0 clips every (non-negative) activation to t, so every score ties: refused where the
spec is parsed, in one line naming the cause and the fix, in every form a user writes it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ash_lightning.callbacks import ActivationShapingCallback
from ash_lightning.errors import UserError
from ash_lightning.shaping.specs import get_shaping
from tests.conftest import main_in_process, tiny_config

BAD = ["react@-1", "react@0", "react@-0.001", "react@nan", "react_and_ash@0@90", "react_and_ash@-2@50"]


@pytest.mark.parametrize("spec", BAD)
def test_react_at_a_threshold_that_ties_every_score_is_refused_with_the_fix(spec: str) -> None:
    with pytest.raises(UserError) as raised:
        get_shaping(spec)
    message = str(raised.value)
    assert "\n" not in message and f"Invalid shaping spec {spec!r}" in message
    assert ("same score" in message or "not a number" in message) and "Fix: use a positive threshold" in message
    assert "react@p90" in message and "Valid forms" not in message  # the form is right, the value is not
    with pytest.raises(UserError, match="Fix: use a positive threshold"):
        ActivationShapingCallback(spec)
    with pytest.raises(UserError, match="Fix: use a positive threshold"):
        ActivationShapingCallback(["none", spec])


@pytest.mark.parametrize("spec", ["react@0.001", "react@1", "react_and_ash@0.5@90", "react@p90"])
def test_a_positive_or_calibrated_threshold_is_accepted(spec: str) -> None:
    shaper = get_shaping(spec)
    if spec != "react@p90":  # calibrated on ID data first
        assert len(torch.unique(shaper(torch.tensor([[0.0, 0.2, 3.0]])))) > 1  # the scores can still differ


def test_main_py_refuses_react_at_minus_one_before_evaluating(
    tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    config = tiny_config(tiny_data, tiny_checkpoint, tmp_path, shaping=["none", "react@-1"])
    status, stdout, stderr = main_in_process(config, tmp_path)
    assert status == 2 and "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "react@-1" in line and "Fix: use a positive threshold" in line
    assert "| **mean** |" not in stdout and not (tmp_path / "run" / "v" / "scores.npz").exists()
