"""The classification head, trained on cached features: Model Maker's recipe.

Dropout 0.2 on the pooled features, one dense layer, cross-entropy with label smoothing 0.1,
a small L2 penalty; Adam, mini-batches of 32. The backbone is not here at all (its features
are fixed), so its batch-norm statistics cannot move: the exported network reuses the
pretrained ones untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefleet.training.convert import require

DROPOUT = 0.2
LABEL_SMOOTHING = 0.1
WEIGHT_DECAY = 1e-4
LEARNING_RATE = 1e-3
BATCH = 32
EpochDone = Callable[[int, int, float], None]


@dataclass
class Head:
    """A dense layer: ``probabilities = softmax(features @ weight.T + bias)``."""

    weight: np.ndarray  # (classes, features)
    bias: np.ndarray  # (classes,)
    history: list[dict[str, float]] = field(default_factory=list)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        logits = features @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        out: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
        return out

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(self.probabilities(features).argmax(axis=1), dtype=np.int64)


def train_head(
    features: np.ndarray,
    targets: np.ndarray,
    classes: int,
    epochs: int,
    seed: int = 0,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    on_epoch: EpochDone | None = None,
) -> Head:
    """Fit the head; ``history`` holds each epoch's training loss and validation accuracy."""
    torch = require("torch", "torch==2.13.0")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    layer = torch.nn.Linear(features.shape[1], classes)
    dropout = torch.nn.Dropout(DROPOUT)
    optimizer = torch.optim.Adam(layer.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64))
    head = Head(np.empty(0), np.empty(0))
    for epoch in range(1, epochs + 1):
        layer.train()
        loss = epoch_loss(lambda batch: layer(dropout(batch)), x, y, optimizer, rng)
        head = _snapshot(layer, head.history)
        record = {"epoch": float(epoch), "loss": loss}
        if validation is not None and len(validation[1]):
            record["val_accuracy"] = float(np.mean(head.predict(validation[0]) == validation[1]))
        head.history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, epochs, record["loss"])
    return head


def epoch_loss(
    logits_of: Callable[[Any], Any], x: Any, y: Any, optimizer: Any, rng: np.random.Generator
) -> float:
    """One pass over ``(x, y)`` in shuffled batches of ``BATCH``: cross-entropy with label
    smoothing on ``logits_of(batch)``, one optimizer step a batch; the mean training loss."""
    torch = require("torch", "torch==2.13.0")
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
    order = torch.from_numpy(rng.permutation(len(x)))
    total = 0.0
    for start in range(0, len(x), BATCH):
        batch = order[start : start + BATCH]
        optimizer.zero_grad()
        loss = loss_fn(logits_of(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
        total += loss.item() * len(batch)
    return total / max(1, len(x))


def _snapshot(layer: object, history: list[dict[str, float]]) -> Head:
    weight = layer.weight.detach().numpy().copy()  # type: ignore[attr-defined]
    bias = layer.bias.detach().numpy().copy()  # type: ignore[attr-defined]
    return Head(weight=weight, bias=bias, history=history)
