"""On a CUDA device: shaping and a whole ``main.py test`` run give the CPU's results. Marked ``gpu`` (select with
``pytest -m gpu``, as bench/device_check.sh does); skipped where CUDA is unavailable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ash_lightning.shaping.specs import get_shaping
from tests.conftest import main_in_process, tiny_config
from tests.run_equality import assert_same_evaluation

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def _exact_float32() -> None:
    """No TF32 in matmuls and convolutions, so CUDA float32 results can be compared with the CPU's."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize("spec", ["ash_p@90", "ash_b@65", "ash_s@90", "react@1.0", "scale@85"])
@pytest.mark.parametrize("shape", [(64, 2048), (8, 512, 7, 7)])
def test_shaping_on_cuda_equals_cpu(spec: str, shape: tuple[int, ...]) -> None:
    activations = torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    shaper = get_shaping(spec)
    on_cpu, on_cuda = shaper(activations), shaper(activations.cuda())
    assert on_cuda.is_cuda
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=1e-5, atol=1e-5)


def test_main_on_gpu_gives_the_cpu_scores(tiny_data: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The same config and sweep on ``accelerator: cpu`` and ``accelerator: gpu``: the same evaluation
    (``tests/run_equality.py``: exact sample sets, scores to float32 rounding, metrics equal or within the near-tie
    bound)."""
    for accelerator in ("cpu", "gpu"):
        config = tiny_config(
            tiny_data, tiny_checkpoint, tmp_path / accelerator, shaping=["ash_s@90", "react@1.0", "scale@85"]
        )
        config["trainer"]["accelerator"] = accelerator
        status, _, err = main_in_process(config, tmp_path)
        assert status == 0, err[-3000:]
    assert_same_evaluation(tmp_path / "cpu" / "run" / "v", tmp_path / "gpu" / "run" / "v")
