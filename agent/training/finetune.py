"""``--fine-tune``: train the last MBConv block and the head conv too, on cached activations.

Everything before the last block stays frozen, so its output is computed once per photo
(PyTorch, no gradients) and kept in memory (7x7x192 floats for lite0: 38 KB a photo). The
last block, the 1x1 head convolution and the classifier are then trained together, starting
from the pretrained weights and the head trained on pooled features. The whole network stays
in ``eval()`` mode throughout: batch-norm layers keep their pretrained running statistics
(their scale and shift may learn), and drop-connect stays off, as in the exported model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.training.convert import require
from edgefleet.training.head import DROPOUT, WEIGHT_DECAY, Head, epoch_loss

TAIL_LEARNING_RATE = 1e-4
HEAD_LEARNING_RATE = 1e-3
TUNED_PREFIXES = ("_blocks.{last}.", "_conv_head.", "_bn1.", "_fc.")
EpochDone = Callable[[int, int, float], None]


@dataclass(frozen=True)
class Tuned:
    """The state-dict entries fine-tuning changed (numpy), and its per-epoch history."""

    state: dict[str, np.ndarray]
    history: list[dict[str, float]]


def tuned_keys(net: Any) -> list[str]:
    prefixes = tuple(p.format(last=len(net._blocks) - 1) for p in TUNED_PREFIXES)
    return [key for key in net.state_dict() if key.startswith(prefixes)]


def trunk(net: Any, nhwc: np.ndarray) -> np.ndarray:
    """Activations entering the last block for a batch of preprocessed NHWC inputs."""
    torch = require("torch", "torch==2.13.0")
    with torch.no_grad():
        x = torch.from_numpy(nhwc).permute(0, 3, 1, 2)
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks[:-1]:
            x = block(x)
    out: np.ndarray = x.numpy()
    return out


def tail(net: Any, activations: Any) -> Any:
    """Pooled features from the last block's input (a torch tensor; gradients flow)."""
    x = net._blocks[-1](activations)
    x = net._swish(net._bn1(net._conv_head(x)))
    return net._avg_pooling(x).flatten(1)


def fine_tune(
    net: Any,
    head: Head,
    activations: np.ndarray,
    targets: np.ndarray,
    epochs: int,
    seed: int = 0,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    on_epoch: EpochDone | None = None,
) -> Tuned:
    """Train the tail of ``net`` (in place) with ``head`` as its starting classifier."""
    torch = require("torch", "torch==2.13.0")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net.eval()  # running statistics frozen, drop-connect off: only the weights learn
    fc = torch.nn.Linear(head.weight.shape[1], head.weight.shape[0])
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(head.weight))
        fc.bias.copy_(torch.from_numpy(head.bias))
    net._fc = fc
    keys = set(tuned_keys(net))
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(name in keys)
    tail_params = [p for n, p in net.named_parameters() if n in keys and not n.startswith("_fc.")]
    optimizer = torch.optim.Adam(
        [
            {"params": tail_params, "lr": TAIL_LEARNING_RATE},
            {"params": list(fc.parameters()), "lr": HEAD_LEARNING_RATE},
        ],
        weight_decay=WEIGHT_DECAY,
    )
    dropout = torch.nn.Dropout(DROPOUT)
    x = torch.from_numpy(activations)
    y = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64))
    history: list[dict[str, float]] = []
    for epoch in range(1, epochs + 1):
        loss = epoch_loss(lambda batch: fc(dropout(tail(net, batch))), x, y, optimizer, rng)
        record = {"epoch": float(epoch), "loss": loss, "fine_tune": 1.0}
        if validation is not None and len(validation[1]):
            predicted = predict(net, validation[0])
            record["val_accuracy"] = float(np.mean(predicted == validation[1]))
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch, epochs, record["loss"])
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    state = {k: v.detach().numpy().copy() for k, v in net.state_dict().items() if k in keys}
    return Tuned(state=state, history=history)


def probabilities(net: Any, activations: np.ndarray) -> np.ndarray:
    torch = require("torch", "torch==2.13.0")
    with torch.no_grad():
        logits = net._fc(tail(net, torch.from_numpy(activations)))
        out: np.ndarray = torch.softmax(logits, dim=1).numpy()
    return out


def predict(net: Any, activations: np.ndarray) -> np.ndarray:
    rows = [probabilities(net, activations[i : i + 64]) for i in range(0, len(activations), 64)]
    return np.asarray(np.concatenate(rows).argmax(axis=1), dtype=np.int64)
