"""``python -m ash_lightning.demo`` (``make demo``): the whole pipeline, offline, in about a minute on a CPU.

1. Builds ``.npz`` data sets from data that ships with scikit-learn, in ``$ASH_DEMO_DIR`` (default
   ``.cache/demo``): ID = its 8x8 digits 0-4 (split into a training and a held-out part), near-OOD = digits
   5-9, far-OOD = patches of its two sample photographs and Gaussian noise; digits are upscaled to 32x32 RGB.
2. Trains ``cifar_resnet20`` on the ID training part with Lightning ``fit`` (inputs transformed exactly as
   the evaluation transforms them) and caches the state_dict there; later runs reuse it.
3. Runs ``main.py test`` on a generated config (a copy ships as ``configs/demo_digits.yaml``): energy,
   ASH-S, ASH-B and SCALE in one sweep, logged to TensorBoard under ``runs/demo``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from sklearn.datasets import load_digits, load_sample_images
from sklearn.model_selection import train_test_split
from timm.data import create_transform
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ash_lightning._files import write_atomically
from ash_lightning.data import OODDataModule, build_source
from ash_lightning.errors import UserError
from ash_lightning.models.backbone import create_backbone

DIR_ENV = "ASH_DEMO_DIR"
DEFAULT_DIR = Path(".cache") / "demo"
DEFAULT_RUNS = Path("runs")
BACKBONE = "cifar_resnet20"
ID_CLASSES = (0, 1, 2, 3, 4)
# The penultimate layer has 64 features: ASH-S and SCALE at the 80th percentile use the top 13, ASH-B the top 16.
SHAPING = ["none", "ash_s@80", "ash_b@75", "scale@80"]
SEED = 0
# One thread: on a shared 2-core machine two threads made training up to 10x slower (each parallel step waits
# for a thread the busy other core has descheduled); on an idle one a second thread saves only ~40%.
THREADS = 1
EPOCHS = 6
BATCH_SIZE = 32
LEARNING_RATE = 0.05
IMAGE_SIZE = 32
HELD_OUT_FRACTION = 1 / 3
PHOTO_PATCHES = 300
NOISE_SAMPLES = 300
CHECKPOINT = f"digits_0_4_{BACKBONE}.pt"
CONFIG = "demo_digits.yaml"
FILES = {
    "train": "digits_0_4_train.npz",
    "test": "digits_0_4_test.npz",
    "digits_5_9": "digits_5_9.npz",
    "photos": "photos.npz",
}


@dataclass(frozen=True)
class DemoRun:
    """What a demo run produced: the results JSON, the TensorBoard folder, and whether it trained."""

    results_json: Path
    log_dir: Path
    trained: bool


# ---------------------------------------------------------------------------------------------- data sets
def _resize(image: np.ndarray) -> np.ndarray:
    """A uint8 image (H×W or H×W×3) resized to IMAGE_SIZE×IMAGE_SIZE×3 with antialiased bilinear filtering."""
    pil = Image.fromarray(image).convert("RGB")
    return np.asarray(pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))


def _photo_patches(count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` square crops (side 32-96 px, resized to 32) at random places of scikit-learn's two photos."""
    photos = load_sample_images().images
    patches = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(IMAGE_SIZE, 3 * IMAGE_SIZE + 1))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        patches.append(_resize(photo[top : top + side, left : left + side]))
    return np.stack(patches)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` atomically (a reader never sees a half-written file)."""
    named: dict[str, Any] = arrays  # Any: mypy matches ``**named`` against savez's ``allow_pickle: bool`` too
    write_atomically(path, lambda tmp: np.savez(tmp, **named), suffix=".npz")


def build_datasets(directory: Path) -> dict[str, Path]:
    """Write the demo's ``.npz`` sets into ``directory`` (deterministic) and return name -> path (see FILES).

    Each holds ``x`` (uint8 N×32×32×3) and ``y`` (digit labels; -1 for photos); digit sets also hold
    ``index``, the sample positions in ``sklearn.datasets.load_digits``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    images = np.stack([_resize((img * (255 / 16)).round().astype(np.uint8)) for img in digits.images])
    labels = digits.target.astype(np.int64)
    in_dist = np.flatnonzero(np.isin(labels, ID_CLASSES))
    train, test = train_test_split(in_dist, test_size=HELD_OUT_FRACTION, random_state=SEED, stratify=labels[in_dist])
    near = np.flatnonzero(~np.isin(labels, ID_CLASSES))
    paths = {name: directory / file for name, file in FILES.items()}
    for name, index in (("train", np.sort(train)), ("test", np.sort(test)), ("digits_5_9", near)):
        _save_npz(paths[name], x=images[index], y=labels[index], index=index)
    photos = _photo_patches(PHOTO_PATCHES, np.random.default_rng(SEED))
    _save_npz(paths["photos"], x=photos, y=np.full(len(photos), -1, dtype=np.int64))
    return paths


# ---------------------------------------------------------------------------------------------- config
def demo_config(data_dir: str, runs_dir: str = str(DEFAULT_RUNS), version: int | str | None = None) -> dict[str, Any]:
    """The ``main.py test`` config of the demo, with data and checkpoint under ``data_dir`` (which may be
    ``$ASH_DEMO_DIR``) and TensorBoard logs under ``runs_dir``/demo (``version`` None: the next free one)."""
    logger_args: dict[str, Any] = {"save_dir": runs_dir, "name": "demo", "default_hp_metric": False}
    if version is not None:
        logger_args["version"] = version
    return {
        "seed_everything": SEED,
        "model": {
            "backbone": BACKBONE,
            "checkpoint_path": f"{data_dir}/{CHECKPOINT}",
            "num_classes": len(ID_CLASSES),
            "shaping": list(SHAPING),
            "placement": "penultimate",
            "score": "energy",
        },
        "data": {
            "id": {"kind": "npz", "path": f"{data_dir}/{FILES['test']}", "name": "digits_0_4"},
            "ood": {
                "digits_5_9": {"kind": "npz", "path": f"{data_dir}/{FILES['digits_5_9']}"},
                "photos": {"kind": "npz", "path": f"{data_dir}/{FILES['photos']}"},
                "noise": {"kind": "gaussian", "num_samples": NOISE_SAMPLES, "size": IMAGE_SIZE},
            },
            "groups": {"near": ["digits_5_9"], "far": ["photos", "noise"]},
            "batch_size": 256,
            "num_workers": 0,
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger", "init_args": logger_args},
        },
    }


# ---------------------------------------------------------------------------------------------- training
class DigitsClassifier(pl.LightningModule):
    """The backbone trained with cross-entropy, SGD (Nesterov) and a one-cycle learning rate; after each
    epoch it prints the training loss and the held-out accuracy."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.model = create_backbone(BACKBONE, num_classes=len(ID_CLASSES)).train()
        self.epochs = epochs
        self.started = time.monotonic()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/accuracy", (self.model(x).argmax(-1) == y).float().mean(), on_epoch=True)

    def on_train_epoch_end(self) -> None:
        metrics = self.trainer.callback_metrics
        print(
            f"  epoch {self.current_epoch + 1}/{self.epochs}: loss {float(metrics['train/loss_epoch']):.3f}, "
            f"held-out accuracy {100 * float(metrics['val/accuracy']):.1f}% "
            f"({time.monotonic() - self.started:.0f} s)",
            flush=True,
        )

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = torch.optim.SGD(self.parameters(), lr=LEARNING_RATE, momentum=0.9, nesterov=True, weight_decay=5e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=LEARNING_RATE,
            total_steps=int(self.trainer.estimated_stepping_batches),  # finite: a fixed number of epochs
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _transformed(path: Path, transform: Any) -> TensorDataset:
    """An ``.npz`` set read as the evaluation reads it, every image passed once through ``transform``."""
    source = build_source({"kind": "npz", "path": str(path)}, "demo")
    images, targets = zip(*(source.dataset[i] for i in range(len(source))), strict=True)
    return TensorDataset(torch.stack([transform(img) for img in images]), torch.tensor(targets))


def train_backbone(
    paths: dict[str, Path], eval_data: dict[str, Any], checkpoint: Path, runs_dir: Path, epochs: int
) -> None:
    """Train on ``paths["train"]`` (validating on ``paths["test"]``) with the transform that the evaluation's
    ``OODDataModule(**eval_data)`` applies, and save the backbone's state_dict to ``checkpoint``."""
    pl.seed_everything(SEED, verbose=False)
    transform = create_transform(**OODDataModule(**eval_data, backbone=BACKBONE).data_config(), is_training=False)
    train = DataLoader(
        _transformed(paths["train"], transform),
        batch_size=BATCH_SIZE,
        shuffle=True,
        generator=torch.Generator().manual_seed(SEED),
    )
    held_out = DataLoader(_transformed(paths["test"], transform), batch_size=256)
    module = DigitsClassifier(epochs)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=TensorBoardLogger(runs_dir / "demo", name="training", default_hp_metric=False),
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train, held_out)
    write_atomically(checkpoint, lambda tmp: torch.save(module.model.state_dict(), tmp))


def _usable(checkpoint: Path) -> bool:
    """True when ``checkpoint`` exists and loads strictly into the demo backbone (else says why not)."""
    if not checkpoint.is_file():
        return False
    try:
        create_backbone(BACKBONE, num_classes=len(ID_CLASSES), checkpoint_path=checkpoint)
    except UserError as err:
        print(f"The cached checkpoint cannot be used ({err}); training a new one.")
        return False
    return True


# ---------------------------------------------------------------------------------------------- the demo
def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it lies below it, else absolute."""
    path = path.resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _quiet_lightning() -> None:
    """Hide Lightning's start-up notices, its hint to use dataloader workers (the demo uses none on purpose)
    and a deprecation notice that torch gives Lightning's own code."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=PossibleUserWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def _evaluate(config_path: Path) -> int:
    """``main.py test --config config_path`` in this process; returns its exit status."""
    from ash_lightning.cli.app import main as cli_main

    argv = sys.argv
    sys.argv = argv[:1]  # LightningCLI warns when given args while the demo's own options are in sys.argv
    try:
        return cli_main(["test", "--config", str(config_path)])
    finally:
        sys.argv = argv


def run_demo(directory: Path, runs_dir: Path = DEFAULT_RUNS, epochs: int = EPOCHS, retrain: bool = False) -> DemoRun:
    """Build the data in ``directory``, train (unless a usable checkpoint is cached there and not ``retrain``),
    evaluate the sweep with ``main.py test``; a UserError when the evaluation fails."""
    directory, runs_dir = directory.resolve(), runs_dir.resolve()
    print(f"Building the data sets in {_shown(directory)} (scikit-learn's digits and sample photos) ...")
    paths = build_datasets(directory)
    checkpoint = directory / CHECKPOINT
    version = TensorBoardLogger(runs_dir, name="demo").version
    config = demo_config(str(directory), str(runs_dir), version)
    trained = retrain or not _usable(checkpoint)
    if trained:
        print(f"Training {BACKBONE} on {len(ID_CLASSES)} digit classes for {epochs} epochs on the CPU ...")
        started = time.monotonic()
        train_backbone(paths, config["data"], checkpoint, runs_dir, epochs)
        print(f"Trained in {time.monotonic() - started:.0f} s; saved {_shown(checkpoint)}")
    else:
        print(f"Reusing the cached checkpoint {_shown(checkpoint)} (pass --retrain to train again).")
    config_path = directory / CONFIG
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(
        f"Evaluating {', '.join(SHAPING)} (energy score): {_venv_command('python')} main.py test --config "
        f"{_shown(config_path)}"
    )
    if _evaluate(config_path) != 0:
        raise UserError("the evaluation stopped; its message is above.")
    log_dir = runs_dir / "demo"
    return DemoRun(log_dir / f"version_{version}" / "ood_results.json", log_dir, trained)


def _venv_command(name: str) -> str:
    """``name`` as a command of this interpreter's environment (``.venv/bin/tensorboard``), relative to the
    current directory when below it, so it works pasted into a fresh shell; ``name`` itself outside one."""
    script = Path(sys.executable).parent / name  # not resolved: a venv's python is a link out of the venv
    if not script.is_file():
        return name
    return os.path.relpath(script) if script.absolute().is_relative_to(Path.cwd()) else str(script.absolute())


def next_steps(run: DemoRun) -> str:
    """The demo's closing lines: how to open its logs and results, and what to try next, as commands that paste."""
    python = _venv_command("python")
    return "\n".join(
        [
            f"Open the logs in TensorBoard: {_venv_command('tensorboard')} --logdir {_shown(run.log_dir)}",
            f"Recompute the table from the saved scores: {python} main.py report {_shown(run.results_json.parent)}",
            "Next: your own data and model. Copy configs/demo_digits.yaml, point data.id / data.ood at your data sets "
            "and model.backbone / model.checkpoint_path at your network, then",
            f"  {python} main.py test --config <your config>.yaml",
            'README.md, "Usage": the command line, the callbacks in your own Lightning project, the functional API.',
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Command line of the demo; returns the exit status (2 with one message for errors a user can cause)."""
    parser = argparse.ArgumentParser(
        prog="python -m ash_lightning.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get(DIR_ENV) or DEFAULT_DIR),
        help=f"data and checkpoint folder (default: ${DIR_ENV} or {DEFAULT_DIR})",
    )
    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS, help="TensorBoard folder (default: runs)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default: {EPOCHS})")
    parser.add_argument("--retrain", action="store_true", help="train even when a cached checkpoint exists")
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"CPU threads for torch (default: {THREADS}, the fastest on a busy 2-core machine)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.threads < 1:
        parser.error("--epochs and --threads must be at least 1")
    _quiet_lightning()
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    try:
        run = run_demo(args.cache_dir, args.runs_dir, args.epochs, args.retrain)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(
            f"error: {err}. Fix: choose writable folders with --cache-dir (or ${DIR_ENV}) and --runs-dir.",
            file=sys.stderr,
        )
        return 2
    print(
        f"\nDemo finished in {time.monotonic() - started:.0f} s; TensorBoard logs (training and evaluation) in "
        f"{_shown(run.log_dir)}.\n{next_steps(run)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
