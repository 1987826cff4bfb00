"""The learning task: a LightningModule with the model, its loss, metrics and local optimizer.

The federated loop only relies on ``training_step``, ``configure_optimizers`` and
``evaluate``, so users bring their own task by subclassing :class:`ClassificationTask` or
by writing a LightningModule with the same three methods.
"""

from __future__ import annotations

from collections.abc import Iterable

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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Mean loss and accuracy over ``batches`` (the test set)."""
        was_training = self.training
        self.eval()
        self.accuracy.reset()
        loss_sum, n = 0.0, 0
        for x, y in batches:
            logits = self.model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            n += len(y)
            self.accuracy.update(logits, y)
        acc = float(self.accuracy.compute())
        self.train(was_training)
        return {"test/acc": acc, "test/loss": loss_sum / max(n, 1)}
