"""Messages name the real cause of a path that cannot be read (a folder where a file is expected, a symlink loop, a
dangling link, a file that is not ours) with the fix of that cause, and never suggest loading a pickle."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ash_lightning._files import path_problem
from ash_lightning.cli.app import main
from ash_lightning.data.sources import build_source
from ash_lightning.errors import UserError
from ash_lightning.evaluation.score_store import save_scores
from ash_lightning.models.checkpoint import read_state_dict

UNSAFE = ("allow_pickle", "pickle.load", "unsafe", "weights_only=False", "trust")


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    """A file, a folder holding one, a missing path, a path under a file, a link to itself, a two-link loop, a
    link to a moved file and a FIFO."""
    made = {
        "file": tmp_path / "real.th",
        "folder": tmp_path / "weights",
        "missing": tmp_path / "nowhere.th",
        "under_a_file": tmp_path / "real.th" / "inside.th",
        "self_loop": tmp_path / "self.th",
        "loop": tmp_path / "a.th",
        "dangling": tmp_path / "latest.th",
        "fifo": tmp_path / "pipe.th",
    }
    made["file"].write_bytes(b"not a checkpoint")
    made["folder"].mkdir()
    (made["folder"] / "resnet20.th").write_bytes(b"")
    made["self_loop"].symlink_to(made["self_loop"])
    made["loop"].symlink_to(tmp_path / "b.th")
    (tmp_path / "b.th").symlink_to(made["loop"])
    made["dangling"].symlink_to(tmp_path / "moved" / "epoch_99.th")
    os.mkfifo(made["fifo"])
    return made


# (path, the start of its cause, a fragment of its own fix or None where the caller's fix applies)
CAUSES = [
    ("folder", "is a folder, not a file (it holds resnet20.th)", None),
    ("missing", "does not exist", None),
    ("under_a_file", "cannot exist: ", None),
    ("self_loop", "is a symbolic link loop", "ls -l"),
    ("loop", "is a symbolic link loop", "ls -l"),
    ("dangling", "is a symbolic link to ", "ln -sfn"),
    ("fifo", "is not a regular file", None),
]


@pytest.mark.parametrize("name, cause, fix", CAUSES, ids=[c[0] for c in CAUSES])
def test_path_problem_names_the_cause_and_its_own_fix(
    name: str, cause: str, fix: str | None, paths: dict[str, Path]
) -> None:
    found, own_fix = path_problem(paths[name], "file")
    assert found.startswith(cause), found
    assert (own_fix is None) if fix is None else (fix in own_fix)
    if name == "dangling":
        assert str(paths["file"].parent / "moved" / "epoch_99.th") in found and "does not exist" in found
    if name == "under_a_file":
        assert repr(str(paths["file"])) in found


def test_path_problem_accepts_what_can_be_read(paths: dict[str, Path]) -> None:
    assert path_problem(paths["file"], "file") is None and path_problem(paths["folder"], "folder") is None
    assert path_problem(paths["file"], "folder") == ("is a file, not a folder", None)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_path_problem_names_a_permission_problem(paths: dict[str, Path]) -> None:
    paths["file"].chmod(0)
    cause, fix = path_problem(paths["file"], "file")
    assert cause == "is not readable (permission denied)" and "chmod" in fix


@pytest.mark.parametrize("name, cause, fix", CAUSES[:-1], ids=[c[0] for c in CAUSES[:-1]])
def test_checkpoint_and_data_paths_say_the_same(name: str, cause: str, fix: str | None, paths: dict[str, Path]) -> None:
    with pytest.raises(UserError) as raised:
        read_state_dict(paths[name])
    message = str(raised.value)
    assert message.startswith(f"checkpoint {str(paths[name])!r} {cause}") and "\n" not in message
    assert ("Fix: point checkpoint_path" in message) if fix is None else ("Fix: " in message and fix in message)
    with pytest.raises(UserError, match="^" + re.escape(f"data.ood.x: path {str(paths[name])!r} {cause}")):
        build_source({"kind": "npz", "path": str(paths[name])}, "data.ood.x")


def test_a_folder_kind_given_a_file_says_so(paths: dict[str, Path]) -> None:
    with pytest.raises(UserError, match="is a file, not a folder. Fix: point `path` at a folder of images"):
        build_source({"kind": "folder", "path": str(paths["file"])}, "data.ood.x")


def test_pickles_are_refused_without_suggesting_to_load_them(tmp_path: Path) -> None:
    data = tmp_path / "images.npz"
    data.write_bytes(pickle.dumps({"x": [1, 2]}))
    with pytest.raises(UserError) as raised:
        build_source({"kind": "npz", "path": str(data)}, "data.ood.x")
    assert "is a Python pickle, not a .npz archive" in str(raised.value)
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"weight": torch.zeros(2), "args": argparse.Namespace(lr=0.1)}, checkpoint)
    with pytest.raises(UserError) as unpickled:
        read_state_dict(checkpoint)
    assert "holds Python objects besides tensors, which are never unpickled" in str(unpickled.value)
    for message in (str(raised.value), str(unpickled.value)):
        assert not any(word in message for word in UNSAFE), message


def _meta() -> dict:
    return {
        "runs": [{"shaping": "none", "score": "energy"}],
        "groups": {},
        "tpr": 0.95,
        "convention": "paper",
        "loaders": [{"name": "id", "role": "id"}, {"name": "far", "role": "ood"}],
    }


def _arrays(n: int) -> dict[str, np.ndarray]:
    return {"scores": np.arange(n, dtype=float)[:, None], "targets": np.zeros(n, np.int64), "index": np.arange(n)}


def _report_targets(root: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """A ``main.py report`` target per mistake, with the fragments of its message (cause, then fix)."""
    runs = {name: root / name for name in ("empty_run", "link_to_moved", "link_loop", "scores_folder", "ours")}
    for run in runs.values():
        run.mkdir()
    (runs["link_to_moved"] / "scores.npz").symlink_to(root / "old" / "scores.npz")
    (runs["link_loop"] / "scores.npz").symlink_to(runs["link_loop"] / "scores.npz")
    (runs["scores_folder"] / "scores.npz").mkdir()
    save_scores(str(runs["ours"] / "scores.npz"), {"id": _arrays(8), "far": _arrays(6)}, _meta())
    files = {name: root / f"{name}.npz" for name in ("pickle", "objects", "npy", "other", "truncated")}
    files["pickle"].write_bytes(pickle.dumps({"id": [1.0, 2.0]}))
    objects = {"__meta__": np.array(json.dumps(_meta())), "id/scores": np.array([{"a": 1}], dtype=object)}
    np.savez(files["objects"], **objects)
    np.save(root / "plain.npy", np.zeros(3))
    (root / "plain.npy").rename(files["npy"])
    np.savez(files["other"], x=np.zeros(3), y=np.ones(3))
    raw = (runs["ours"] / "scores.npz").read_bytes()
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    return {
        "run_without_scores": (runs["empty_run"], ("holds no scores.npz", "Fix: pass a run folder")),
        "dangling_link": (runs["link_to_moved"], ("is a symbolic link to", "which does not exist", "Fix: restore")),
        "link_loop": (runs["link_loop"], ("is a symbolic link loop", "Fix: replace the link")),
        "folder_for_a_file": (runs["scores_folder"], ("is a folder, not a file (empty)", "Fix: pass a run folder")),
        "pickle": (files["pickle"], ("is a Python pickle, not a .npz archive", "Fix: pass a run folder")),
        "pickled_objects": (files["objects"], ("holds pickled Python objects", "Fix: pass a run folder")),
        "npy": (files["npy"], ("is a single .npy array", "Fix: pass a run folder")),
        "another_npz": (files["other"], ("a .npz archive of other arrays (x, y; no __meta__)", "Fix: pass a run")),
        "truncated": (files["truncated"], ("is damaged or truncated", "Fix: rerun the evaluation")),
    }


REPORT_CASES = [
    "run_without_scores",
    "dangling_link",
    "link_loop",
    "folder_for_a_file",
    "pickle",
    "pickled_objects",
    "npy",
    "another_npz",
    "truncated",
]


def test_report_names_the_real_cause_of_each_target_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    targets = _report_targets(tmp_path)
    assert set(targets) == set(REPORT_CASES)
    for case, (target, fragments) in targets.items():
        status = main(["report", str(target)])
        out, err = capsys.readouterr()
        assert status == 2 and "Traceback" not in err and not out, (case, err)
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        for fragment in fragments:
            assert fragment in line, (case, line)
        assert not any(word in line for word in UNSAFE), (case, line)
    assert main(["report", str(tmp_path / "ours")]) == 0  # the one complete scores.npz among them
