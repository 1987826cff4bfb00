"""A LightningModule and a LightningDataModule as the Lightning docs teach them: dict
batches with a custom collate_fn, ``self.log`` of tensors and a torchmetrics Metric,
``configure_optimizers`` in the form chosen by ``optim``. Nothing here knows fedbat."""

from __future__ import annotations

import os
import time

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics.classification import MulticlassAccuracy


class DigitsDicts(Dataset):
    """scikit-learn's digits as ``{"image": (1, 8, 8), "label": int}`` samples."""

    def __init__(self, train: bool) -> None:
        x, y = load_digits(return_X_y=True)
        cut = int(0.8 * len(y))
        sl = slice(0, cut) if train else slice(cut, None)
        self.x = torch.tensor(x[sl] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
        self.targets = [int(v) for v in y[sl]]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.targets[i]}


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples]),
    }


class DigitsDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str | None = None) -> None:
        self.train, self.val = DigitsDicts(train=True), DigitsDicts(train=False)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, self.batch_size, shuffle=True, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, 256, collate_fn=collate)


class DigitsThreeWay(DigitsDataModule):
    """Train, validation and test loaders, as the Lightning docs split a dataset: the
    held-out fifth of digits halved into validation and test."""

    def setup(self, stage: str | None = None) -> None:
        self.train, held = DigitsDicts(train=True), DigitsDicts(train=False)
        half = len(held) // 2
        self.val = Subset(held, range(half))
        self.test = Subset(held, range(half, len(held)))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, 256, collate_fn=collate)


class LitClassifier(L.LightningModule):
    def __init__(self, lr: float = 0.1, optim: str = "optimizer", hidden: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )
        self.val_acc = MulticlassAccuracy(num_classes=10)
        self.epochs_started = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        self.epochs_started += 1

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        loss = F.cross_entropy(self(batch["image"]), batch["label"])
        self.log("train_loss", loss)
        return {"loss": loss}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["image"])
        self.log("val_loss", F.cross_entropy(logits, batch["label"]))
        self.val_acc(logits, batch["label"])
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        step = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        forms = {
            "optimizer": lambda: opt,
            "list": lambda: [opt],
            "lists": lambda: ([opt], [step]),
            "dict": lambda: {"optimizer": opt, "lr_scheduler": step},
            "dict-step": lambda: {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": step, "interval": "step", "frequency": 4},
            },
            "two": lambda: [opt, torch.optim.Adam(self.parameters())],
            "plateau": lambda: {
                "optimizer": opt,
                "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
                "monitor": "val_loss",
            },
        }
        return forms[self.hparams.optim]()


class ManualClassifier(LitClassifier):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.automatic_optimization = False


class ReturnsClassifier(LitClassifier):
    """LitClassifier whose ``training_step`` returns what it was told to (None, a dict)."""

    def __init__(self, returns: object = None, **kw) -> None:
        super().__init__(**kw)
        self.returns = returns

    def training_step(self, batch: dict, batch_idx: int) -> object:
        super().training_step(batch, batch_idx)
        return self.returns


class PacedClassifier(LitClassifier):
    """LitClassifier whose steps take ``$FEDBAT_TEST_PACE`` seconds more of wall time, and no
    more CPU: it stretches a cluster job past its time limit without changing a result."""

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        time.sleep(float(os.environ.get("FEDBAT_TEST_PACE", "0")))


class FrozenBackbone(LitClassifier):
    """Fine-tuning as users write it: a "pretrained" backbone frozen (requires_grad=False,
    left in train mode, so its BatchNorm statistics still move), a constant buffer, and a
    trainable head; the optimizer holds only the trainable parameters."""

    def __init__(self, lr: float = 0.5) -> None:
        super().__init__(lr=lr)
        self.backbone = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256)
        )
        self.backbone.requires_grad_(False)
        self.register_buffer("scale", torch.full((256,), 0.5))  # never changes
        self.head = nn.Linear(256, 10)
        del self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.backbone(x)) * self.scale)

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(trainable, lr=self.hparams.lr)


class DocsClassifier(LitClassifier):
    """Validation and test as the Lightning docs write them: ``val_acc`` from
    ``validation_step``, ``test_acc`` from ``test_step``, each with its own Metric."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.validated = self.tested = 0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.validated += 1
        self.val_acc(self(batch["image"]), batch["label"])
        self.log("val_acc", self.val_acc)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.tested += 1
        self.test_acc(self(batch["image"]), batch["label"])
        self.log("test_acc", self.test_acc)


class BatchNormClassifier(LitClassifier):
    """LitClassifier with a BatchNorm layer: running statistics that a step moves."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
        )
