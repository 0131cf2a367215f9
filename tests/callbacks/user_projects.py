"""Two kinds of user project, written into a folder by the tests: the Hydra template kind and the LightningCLI
kind shaped like Lightning's ImageNet example. Their code knows nothing of ash-lightning; OOD evaluation comes
from configuration alone. Written for ``lightning``; ``for_package`` rewrites the imports for ``pytorch_lightning``.
"""

from __future__ import annotations

from pathlib import Path

# ------------------------------------------------------------------ the Hydra template kind
HYDRA_MODELS = """
import lightning as L
import torch
from torch import nn
from torchmetrics.classification import Accuracy


class SimpleDenseNet(nn.Module):
    def __init__(self, input_size: int = 64, lin1_size: int = 16, output_size: int = 4):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(input_size, lin1_size), nn.ReLU(), nn.Linear(lin1_size, output_size))

    def forward(self, x):
        return self.model(x.view(x.size(0), -1))


class LitModule(L.LightningModule):
    def __init__(self, net, optimizer, compile: bool = False, tags=()):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = net
        self.test_acc = Accuracy(task="multiclass", num_classes=4)

    def forward(self, x):
        return self.net(x)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self.forward(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.test_acc(logits.argmax(dim=1), y)
        self.log("test/loss", loss, on_epoch=True)
        self.log("test/acc", self.test_acc, on_epoch=True)

    def configure_optimizers(self):
        return self.hparams.optimizer(params=self.parameters())
"""

HYDRA_DATA = '''
import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class GrayDigits(Dataset):
    """(x, y): one-channel 8x8 images."""

    def __init__(self, n: int, shift: float, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 1, 8, 8, generator=g) + shift
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class DigitsDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int = 16):
        super().__init__()
        self.save_hyperparameters(logger=False)

    def test_dataloader(self):
        return DataLoader(GrayDigits(40, 0.0, 0), batch_size=self.hparams.batch_size)
'''

# src/eval.py of the template: the trainer is instantiated without the callbacks config.
HYDRA_EVAL = """
import sys
from pathlib import Path

import hydra
import lightning as L
import torch

with hydra.initialize_config_dir(str(Path("configs").resolve()), version_base="1.3"):
    cfg = hydra.compose("eval", overrides=sys.argv[1:])
L.seed_everything(0)
datamodule = hydra.utils.instantiate(cfg.data)
model = hydra.utils.instantiate(cfg.model)
trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
torch.save(model.net.state_dict(), "net.pt")  # for the test's own computation
trainer.test(model=model, datamodule=datamodule)
print("USER METRICS", {k: float(v) for k, v in trainer.callback_metrics.items()})
"""

HYDRA_CONFIGS = {
    "eval.yaml": """
defaults:
  - _self_
  - data: digits
  - model: dense
  - trainer: default
""",
    "data/digits.yaml": """
_target_: data.DigitsDataModule
batch_size: 16
""",
    "model/dense.yaml": """
_target_: models.LitModule
optimizer:
  _target_: torch.optim.Adam
  _partial_: true
  lr: 0.001
net:
  _target_: models.SimpleDenseNet
  input_size: 64
  lin1_size: 16
  output_size: 4
compile: false
tags: [dev, ood]
""",
    "trainer/default.yaml": """
_target_: lightning.pytorch.trainer.Trainer
default_root_dir: out
accelerator: cpu
devices: 1
enable_model_summary: false
""",
    # the README's recipe: configs/callbacks/ood.yaml
    "callbacks/ood.yaml": """
shaping:
  _target_: ash_lightning.callbacks.ActivationShapingCallback
  spec: ash_s@90
ood_metrics:
  _target_: ash_lightning.callbacks.OODMetricsCallback
  output_dir: ood
  log_figures: false
  ood:
    shifted:
      _target_: data.GrayDigits
      n: 30
      shift: 1.5
      seed: 1
    stored: npz:NPZ_PATH
  transform:
    _target_: torchvision.transforms.ToTensor
""",
}

# ------------------------------------------------------------------ the LightningCLI kind (ImageNet example)
CLI_MODEL = '''
import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


class ImageNetLightningModel(L.LightningModule):
    def __init__(self, data_path: str, batch_size: int = 8, workers: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(
            nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)
        )

    def forward(self, x):
        return self.model(x)

    def test_step(self, batch, batch_idx):
        images, target = batch
        output = self.model(images)
        loss_val = nn.functional.cross_entropy(output, target)
        self.log("test_loss", loss_val)
        return loss_val

    def test_dataloader(self):
        normalize = transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
        dataset = datasets.ImageFolder(
            self.hparams.data_path, transforms.Compose([transforms.CenterCrop(8), transforms.ToTensor(), normalize])
        )
        return DataLoader(dataset, batch_size=self.hparams.batch_size, num_workers=self.hparams.workers)


class Noise(torch.utils.data.Dataset):
    """(x, y) noise images, already tensors."""

    def __init__(self, n: int = 20, seed: int = 0):
        self.x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0
'''

CLI_MAIN = """
from lightning.pytorch.cli import LightningCLI

from model import ImageNetLightningModel

if __name__ == "__main__":
    LightningCLI(ImageNetLightningModel, save_config_callback=None)
"""

TO_PYTORCH_LIGHTNING = {
    "import lightning as L": "import pytorch_lightning as L",
    "from lightning.pytorch.cli import": "from pytorch_lightning.cli import",
    "lightning.pytorch.trainer.Trainer": "pytorch_lightning.Trainer",
}


def for_package(text: str, package: str) -> str:
    """``text`` written for ``lightning``, as it reads for ``package``."""
    if package == "pytorch_lightning":
        for unified, classic in TO_PYTORCH_LIGHTNING.items():
            text = text.replace(unified, classic)
    return text


def write_project(folder: Path, files: dict[str, str], package: str) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(for_package(text, package))
