"""The classification head, trained on cached features until it has converged.

The backbone is frozen, so the head is a multinomial logistic regression on its pooled
features: a convex problem, solved in full batches by L-BFGS (float64) until the gradient
or the loss stops moving, never for a fixed number of epochs. What varies with the data is
how strongly the weights are held back (L2); it is picked from ``L2_GRID`` by the weighted
log-loss on the validation split (3 stratified folds of the training split when there is
none), then the head is fitted once more on everything it may learn from (training plus
validation) with that strength.

Classes are weighted by ``n / (classes * count)``, so a class with a tenth of the photos
counts as much as the others. Features are centred and divided by one scale for the solver
(so that one grid suits every backbone), folded back into the weights and bias, so the
exported layer is a plain ``features @ W.T + b``. One scale, not one per feature: a feature
that barely varies would get a weight hundreds of times the others', and the int8 file
quantizes a dense layer's weights on one scale, which would leave the rest a few levels. The
backbone's batch-norm statistics are not here at all: the exported network reuses the
pretrained ones untouched.

``DROPOUT``, ``WEIGHT_DECAY`` and ``epoch_loss`` are the recipe of ``--fine-tune``, which
trains the last block with the head in mini-batches (``finetune``).
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
# L2 strength per mean training example, from weak to strong: on features that separate the
# classes the weakest wins; on data unlike ImageNet a stronger one keeps the head general.
L2_GRID = (1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
MAX_ITERATIONS = 1000
GRADIENT_TOLERANCE = 1e-6
CHANGE_TOLERANCE = 1e-10
FOLDS = 3
Step = Callable[[int, int], None]  # (fits done, fits in all)


@dataclass
class Head:
    """A dense layer: ``probabilities = softmax(features @ weight.T + bias)``.

    ``history``: one record per fit (the L2 strength, iterations, why it stopped, and the
    validation loss and accuracy for the fits that chose the strength); ``fit`` says how the
    final one went, ``class_weights`` what each class counted. ``checked``: with a
    validation split, the fit on the training split alone at the chosen strength, whose
    answers on the validation photos are out of sample (``robust`` compares heads by it)."""

    weight: np.ndarray  # (classes, features)
    bias: np.ndarray  # (classes,)
    history: list[dict[str, Any]] = field(default_factory=list)
    fit: dict[str, Any] = field(default_factory=dict)
    class_weights: list[float] = field(default_factory=list)
    checked: Head | None = None

    def logits(self, features: np.ndarray) -> np.ndarray:
        out: np.ndarray = features @ self.weight.T + self.bias
        return out

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        logits = self.logits(features)
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        out: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
        return out

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(self.logits(features).argmax(axis=1), dtype=np.int64)


def class_weights(targets: np.ndarray, classes: int) -> np.ndarray:
    """``n / (classes * count)`` per class (1.0 for all when balanced; 0 for an absent one)."""
    counts = np.bincount(targets, minlength=classes).astype(np.float64)
    weights = np.zeros(classes)
    present = counts > 0
    weights[present] = len(targets) / (int(present.sum()) * counts[present])
    return weights


def train_head(
    features: np.ndarray,
    targets: np.ndarray,
    classes: int,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    on_step: Step | None = None,
) -> Head:
    """Pick the L2 strength (on ``validation``, else on folds of the training split), then
    fit on training plus validation with it; see the module docstring."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    weights = class_weights(y, classes)
    have_validation = validation is not None and len(validation[1]) > 0
    trials = _trials(x, y, validation if have_validation else None)
    total = len(L2_GRID) * len(trials) + 1
    done = 0
    history: list[dict[str, Any]] = []
    checked: dict[float, Head] = {}
    for l2 in L2_GRID:
        losses, hits, seen = 0.0, 0, 0
        for fit_x, fit_y, val_x, val_y in trials:
            head = _fit(fit_x, fit_y, classes, l2, class_weights(fit_y, classes))
            if have_validation:
                checked[l2] = head
            losses += _weighted_log_loss(head, val_x, val_y, weights) * len(val_y)
            hits += int(np.sum(head.predict(val_x) == val_y))
            seen += len(val_y)
            done += 1
            if on_step is not None:
                on_step(done, total)
        history.append(
            {
                "l2": l2,
                "val_loss": losses / max(1, seen),
                "val_accuracy": hits / max(1, seen),
                "iterations": head.fit["iterations"],
                "stopped": head.fit["stopped"],
            }
        )
    best = min(history, key=lambda r: (round(r["val_loss"], 6), -r["l2"]))
    if have_validation and validation is not None:
        x = np.concatenate([x, np.asarray(validation[0], dtype=np.float64)])
        y = np.concatenate([y, np.asarray(validation[1], dtype=np.int64)])
    final = _fit(x, y, classes, best["l2"], class_weights(y, classes))
    if on_step is not None:
        on_step(total, total)
    final.history = history
    final.checked = checked.get(best["l2"])
    final.fit = {
        **final.fit,
        "l2": best["l2"],
        "chosen_on": "validation" if have_validation else f"{len(trials)} folds of train",
        "fitted_on": len(y),
    }
    return final


def _trials(
    x: np.ndarray, y: np.ndarray, validation: tuple[np.ndarray, np.ndarray] | None
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(fit features, fit targets, check features, check targets) for each trial fit."""
    if validation is not None:
        return [(x, y, np.asarray(validation[0], np.float64), np.asarray(validation[1]))]
    fold = np.zeros(len(y), dtype=np.int64)
    for label in np.unique(y):
        where = np.flatnonzero(y == label)
        fold[where] = np.arange(len(where)) % FOLDS
    trials = []
    for k in range(FOLDS):
        fit, check = fold != k, fold == k
        if check.any() and fit.any():
            trials.append((x[fit], y[fit], x[check], y[check]))
    if not trials:  # one image in all: nothing to hold out, the middle strength
        trials.append((x, y, x, y))
    return trials


def _weighted_log_loss(head: Head, x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
    probabilities = head.probabilities(x)
    picked = np.clip(probabilities[np.arange(len(y)), y], 1e-12, 1.0)
    w = weights[y]
    return float(-(w * np.log(picked)).sum() / max(w.sum(), 1e-12))


def _fit(x: np.ndarray, y: np.ndarray, classes: int, l2: float, weights: np.ndarray) -> Head:
    """One L-BFGS solve of the weighted, L2-penalised cross-entropy (see module docstring)."""
    torch = require("torch", "torch==2.13.0")
    mean = x.mean(axis=0)
    scale = float(np.sqrt(np.mean((x - mean) ** 2))) or 1.0
    xs = torch.from_numpy((x - mean) / scale)
    ys = torch.from_numpy(y)
    sample_w = torch.from_numpy(weights[y] / weights[y].mean())
    w = torch.zeros((classes, x.shape[1]), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=MAX_ITERATIONS,
        tolerance_grad=GRADIENT_TOLERANCE,
        tolerance_change=CHANGE_TOLERANCE,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Any:
        optimizer.zero_grad()
        losses = torch.nn.functional.cross_entropy(xs @ w.T + b, ys, reduction="none")
        loss = (losses * sample_w).mean() + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    loss = float(closure().item())
    gradient = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
    iterations = int(optimizer.state[w]["n_iter"])
    if gradient <= GRADIENT_TOLERANCE:
        stopped = "converged: gradient below tolerance"
    elif iterations >= MAX_ITERATIONS:
        stopped = f"iteration limit ({MAX_ITERATIONS}) reached, gradient {gradient:.1e}"
    else:
        stopped = "converged: the loss stopped changing"
    weight = w.detach().numpy() / scale
    bias = b.detach().numpy() - weight @ mean
    return Head(
        weight=weight.astype(np.float32),
        bias=bias.astype(np.float32),
        fit={"iterations": iterations, "stopped": stopped, "loss": loss, "gradient": gradient},
        class_weights=[float(v) for v in weights],
    )


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
