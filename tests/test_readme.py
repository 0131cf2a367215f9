"""The README's examples run as written, the callback example under both Lightning packages with the same output."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO

README = (REPO / "README.md").read_text()
# The README imports the unified package; the same example on pytorch_lightning differs in its imports only.
TO_PYTORCH_LIGHTNING = {
    "import lightning as L": "import pytorch_lightning as L",
    "from lightning.pytorch.loggers import": "from pytorch_lightning.loggers import",
}


def _block_after(marker: str) -> str:
    match = re.search(re.escape(marker) + r".*?```python\n(.*?)```", README, flags=re.S)
    assert match, f"README has no python block after {marker!r}"
    return match.group(1)


def _run(code: str, folder: Path) -> str:
    folder.mkdir()
    (folder / "example.py").write_text(code)
    proc = subprocess.run([sys.executable, "example.py"], cwd=folder, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_readme_starts_with_the_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]


def _tensorboard(run_dir: Path) -> dict[str, object]:
    """Every tag of the run's TensorBoard events with its values (scalars), bucket counts (histograms) and
    image sizes (figures)."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    return {
        "scalars": {t: [e.value for e in events.Scalars(t)] for t in tags["scalars"]},
        "histograms": {t: [e.histogram_value.num for e in events.Histograms(t)] for t in tags["histograms"]},
        "images": {t: [(e.width, e.height) for e in events.Images(t)] for t in tags["images"]},
    }


def test_readme_callback_example_gives_the_same_run_under_both_lightning_packages(tmp_path: Path) -> None:
    code = _block_after("<!-- README example: callbacks")
    assert all(line in code for line in TO_PYTORCH_LIGHTNING)
    runs = {}
    for package in ("lightning", "pytorch_lightning"):
        if package == "pytorch_lightning":
            for unified, classic in TO_PYTORCH_LIGHTNING.items():
                code = code.replace(unified, classic)
        stdout = _run(code, tmp_path / package)
        mean = eval(stdout.strip().splitlines()[-1])  # the example's last line prints the mean metrics dict
        assert set(mean) == {"fpr95", "auroc", "aupr_in", "aupr_out"} and all(0 <= v <= 1 for v in mean.values())
        (run_dir,) = (tmp_path / package / "runs" / "my_project").glob("version_*")
        files = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("events.out.tfevents"))
        runs[package] = {"mean": mean, "files": files, "tensorboard": _tensorboard(run_dir)}
    unified, classic = runs["lightning"], runs["pytorch_lightning"]
    assert {"ood_results.json", "ood_results.csv", "scores.npz", "curves.png"} <= set(unified["files"])
    board = unified["tensorboard"]
    assert {"ood/noise_far/fpr95", "ood/mean/auroc", "ood/group_far/aupr_in", "id/accuracy"} <= set(board["scalars"])
    assert set(board["histograms"]) == {"scores/id", "scores/noise_far", "scores/noise_near"}
    assert set(board["images"]) == {"curves/roc_pr"}
    assert unified == classic


def test_readme_calibration_example_runs(tmp_path: Path) -> None:
    stdout = _run(_block_after("<!-- README example: calibration"), tmp_path / "calibration")
    (threshold,) = eval(stdout.strip().splitlines()[-1])
    assert threshold > 0
