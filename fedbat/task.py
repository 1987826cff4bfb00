"""The built-in learning task: a plain LightningModule (model, cross-entropy, torchmetrics
accuracy, the client's local SGD), written as any Lightning user writes one. fedbat relies
on nothing beyond the LightningModule contract (``fedbat/contract.py``), so a user's own
module takes its place unchanged (``fedbat.fit`` or ``task._target_=...``)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class ClassificationTask(L.LightningModule):
    """Cross-entropy classification with torchmetrics accuracy and the client's local SGD."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        # evaluated on one process (rank 0): no cross-process sync of the metric state
        self.accuracy = MulticlassAccuracy(
            num_classes=num_classes, average="micro", sync_on_compute=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int = 0):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int = 0) -> None:
        x, y = batch
        logits = self.model(x)
        self.accuracy.update(logits, y)
        self.log("test/acc", self.accuracy)  # first: monitor=auto picks it
        self.log("test/loss", F.cross_entropy(logits, y), batch_size=len(y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
