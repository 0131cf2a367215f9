"""Sweeps: one backbone pass per batch for a whole grid, each entry equal to its setting run alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ash_lightning.module import OODEvalModule
from tests.conftest import run_main, tiny_config

GRID = [
    "none",
    "ash_p@65",
    "ash_p@90",
    "ash_b@65",
    "ash_b@90",
    "ash_s@65",
    "ash_s@80",
    "ash_s@90",
    "scale@85",
    "react@1.0",
    "react_and_ash@1.0@90",
    "ash_b@80",
]


def _count_backbone_passes(module: OODEvalModule) -> list[int]:
    calls = [0]
    module.model.conv1.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("placement", ["penultimate", "pre_pool"])
def test_grid_runs_backbone_once_and_equals_single_settings(tiny_checkpoint: Path, placement: str) -> None:
    grid = OODEvalModule(
        "cifar_resnet20",
        checkpoint_path=str(tiny_checkpoint),
        shaping=GRID,
        placement=placement,
        score=["energy", "max_logit"],
    )
    assert len(grid.runs) == 24
    calls = _count_backbone_passes(grid)
    torch.manual_seed(0)
    batches = [(torch.rand(7, 3, 32, 32), torch.randint(0, 10, (7,)), torch.arange(7) + 7 * b) for b in range(3)]
    outputs = []
    for b, batch in enumerate(batches):
        outputs.append(grid.test_step(batch, b))
        assert calls[0] == b + 1  # one backbone pass per batch for the whole grid
    for s, spec in enumerate(GRID):
        alone = OODEvalModule(
            "cifar_resnet20",
            checkpoint_path=str(tiny_checkpoint),
            shaping=spec,
            placement=placement,
            score=["energy", "max_logit"],
        )
        for batch, out in zip(batches, outputs, strict=True):
            single = alone.test_step(batch, 0)
            torch.testing.assert_close(out["logits"][:, s], single["logits"], rtol=0, atol=1e-5)
            torch.testing.assert_close(out["scores"][:, 2 * s : 2 * s + 2], single["scores"], rtol=0, atol=1e-5)
            assert torch.equal(out["preds"][:, 2 * s], single["preds"][:, 0])


def test_other_placements_run_the_network_once_per_setting(
    tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    grid = OODEvalModule(
        "cifar_resnet20", checkpoint_path=str(tiny_checkpoint), shaping=["ash_p@65", "ash_s@90"], placement="layer3"
    )
    calls = _count_backbone_passes(grid)
    with caplog.at_level("WARNING"):
        grid.on_test_start()
    assert "once per shaping setting" in caplog.text
    grid.test_step((torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long), torch.arange(2)), 0)
    assert calls[0] == 2


def test_sweep_results_ranking_figure_and_validation_selection(
    tiny_data: dict, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    config = tiny_config(tiny_data, tiny_checkpoint, tmp_path, shaping=["none", "ash_s@65", "ash_s@90", "ash_b@90"])
    config["data"]["val_id"] = {"kind": "npz", "path": str(tiny_data["id"]), "limit": 40}
    config["data"]["val_ood"] = {"bright": {"kind": "npz", "path": str(tiny_data["bright"]), "limit": 20}}
    proc = run_main(config, tmp_path, "--model.score", "[energy, msp]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run" / "v"
    results = json.loads((out / "ood_results.json").read_text())
    assert [(r["shaping"], r["score"]) for r in results["runs"]] == [
        (s, c) for s in ["none", "ash_s@65", "ash_s@90", "ash_b@90"] for c in ["energy", "msp"]
    ]
    means = [(r["mean"]["fpr95"], -r["mean"]["auroc"]) for r in results["runs"]]
    assert [means[i] for i in results["ranking"]] == sorted(means)
    # The selected setting is the best on validation data, and its reported numbers are its test numbers.
    val_means = [(r["validation"]["mean"]["fpr95"], -r["validation"]["mean"]["auroc"]) for r in results["runs"]]
    selected = results["selected"]
    assert val_means[selected["run"]] == min(val_means)
    assert selected["test_mean"] == results["runs"][selected["run"]]["mean"]
    assert set(results["runs"][0]["ood"]) == {"dark", "bright"}  # validation sets are not test sets
    assert results["counts"]["val_id"] == 40 and results["counts"]["val_bright"] == 20
    assert (out / "sweep.png").stat().st_size > 1000
    assert "All 8 settings, ranked" in proc.stdout and "Selected on validation data" in proc.stdout
    # The per-set table is the selected setting's, the protocol of OpenOOD v1.5: chosen on validation, shown on test.
    sel = results["runs"][selected["run"]]
    flag = " ⚠" if sel["equal_id_scores"] else ""  # e.g. msp saturated at 1.0 by ash_s@90 on this tiny network
    assert f"### {sel['shaping']} + {sel['score']}{flag} (selected on validation data)" in proc.stdout
    csv_rows = (out / "ood_results.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 8 * (2 + 2 + 1)
