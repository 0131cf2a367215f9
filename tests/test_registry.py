"""One registry for shapings, scores and detectors: what list_* shows, descriptions from docstrings, duplicate
names refused, unknown names answered with the valid forms; ``main.py list`` prints them all."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ash_lightning._registry import Registry, describe
from ash_lightning.detectors.spec import DETECTORS, list_detectors, parse_detector, register_detector
from ash_lightning.scores.specs import get_score, list_scores, register_score
from ash_lightning.shaping.specs import get_shaping, list_shapings
from tests.conftest import REPO


def test_list_functions_hold_every_builtin_with_form_and_description() -> None:
    shapings = {e.name: e for e in list_shapings()}
    assert list(shapings)[:7] == ["none", "ash_p", "ash_b", "ash_s", "ash_rand", "react_and_ash", "scale"]
    # registered once each, by ash_lightning.shaping.calibrated (react: fixed or calibrated threshold)
    assert list(shapings)[7:11] == ["react", "vra", "dice", "lts"]
    assert shapings["ash_s"].form == "ash_s[@<percentile>=65]"
    assert shapings["ash_s"].description.startswith("ASH-S: keep the top-k values of each sample times exp(s1 / s2)")
    assert shapings["react"].form == "react@<threshold>|react@p<percentile>"
    scores = {e.name: e for e in list_scores()}
    assert list(scores) == ["energy", "msp", "max_logit", "gen", "neg_entropy"]
    assert scores["gen"].form == "gen[@<gamma>=0.1][@<m>=100]"
    assert scores["msp"].description == "Maximum softmax probability: max_k softmax(logits)_k"
    detectors = {e.name: e for e in list_detectors()}
    assert detectors.keys() == DETECTORS.keys() and "knn" in detectors and detectors["knn"].form == "knn@K[@fraction]"
    assert detectors["vim"].description.startswith("ViM, Virtual-logit Matching")
    for entry in [*shapings.values(), *scores.values(), *detectors.values()]:
        assert entry.description and "\n" not in entry.description and "``" not in entry.description


def test_describe_takes_the_first_sentence_without_a_restated_form() -> None:
    def knn() -> None:
        """``knn@K``: distance to the K-th neighbour, as in the paper.

        More text."""

    assert describe(knn) == "distance to the K-th neighbour, as in the paper"
    assert describe(object()) != "" and describe(lambda: None) == ""


def test_duplicate_names_are_refused_unless_replaced() -> None:
    registry: Registry[int] = Registry("thing")
    registry.register("one", "one@<n>", description="the first")(1)
    with pytest.raises(ValueError, match=r"Thing 'one' is already registered \(one@<n>\); pass replace=True"):
        registry.register("one")
    registry.register("one", replace=True)(11)
    assert registry["one"] == 11 and len(registry) == 1 and registry.forms() == "one"
    with pytest.raises(ValueError, match="must not contain '@'"):
        registry.register("a@b")
    with pytest.raises(ValueError, match="already registered"):
        register_score("energy")
    with pytest.raises(ValueError, match="already registered"):
        register_detector(DETECTORS["knn"])


def test_get_functions_name_the_valid_forms() -> None:
    with pytest.raises(
        ValueError,
        match=r"Invalid shaping spec 'ash': unknown shaping name 'ash'\. Valid forms: none, ash_p\[@<percentile>=65\]",
    ):
        get_shaping("ash")
    with pytest.raises(
        ValueError,
        match=r"Invalid score spec 'energi': unknown score name 'energi'\. Valid forms: energy\[@<temperature>=1\]",
    ):
        get_score("energi")
    with pytest.raises(
        ValueError,
        match=r"Invalid detector spec 'knm': unknown detector name 'knm'\. Valid forms: mds, rmds, knn@K\[@fraction\]",
    ):
        parse_detector("knm")


def test_main_list_prints_every_form_with_a_description() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "list"], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    sections = dict(block.split(":\n", 1) for block in proc.stdout.strip().split("\n\n"))
    assert list(sections) == ["shapings", "scores", "detectors"]
    for title, entries in (("shapings", list_shapings()), ("scores", list_scores()), ("detectors", list_detectors())):
        lines = sections[title].splitlines()
        assert len(lines) == len(entries)
        for line, entry in zip(lines, entries, strict=True):
            form, description = line.split(None, 1)
            assert (form, description) == (entry.form, entry.description)
    bad = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "list", "extra"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: main.py list takes no arguments")
