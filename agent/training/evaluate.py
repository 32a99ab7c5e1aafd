"""Scores of a classifier on labelled images: accuracy, per-class figures, confusion.

``score`` works on predictions from anywhere (the head on cached features, or a ``.tflite``
file run exactly as the agent runs it, through ``predict_file``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.errors import UserError
from edgefleet.inference.classifier import Classifier, read_model_info
from edgefleet.inference.images import decode_image
from edgefleet.inference.litert import get_runtime
from edgefleet.training.dataset import Dataset
from edgefleet.training.features import grey_noise

Progress = Callable[[int, int], None]
OTHER = -1  # a prediction of a model label that is no class of the folder


@dataclass(frozen=True)
class Scores:
    """``confusion[i][j]``: images of class ``i`` predicted as ``j`` (a last column counts
    predictions outside the folder's classes, when a model has more labels than it)."""

    labels: tuple[str, ...]
    confusion: np.ndarray

    @property
    def total(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        n = len(self.labels)
        return float(np.trace(self.confusion[:, :n])) / self.total if self.total else 0.0

    def per_class(self) -> list[dict[str, Any]]:
        rows = []
        for i, label in enumerate(self.labels):
            hit = int(self.confusion[i, i])
            predicted = int(self.confusion[:, i].sum())
            support = int(self.confusion[i].sum())
            rows.append(
                {
                    "label": label,
                    "precision": hit / predicted if predicted else 0.0,
                    "recall": hit / support if support else 0.0,
                    "support": support,
                }
            )
        return rows

    def confused(self, most: int = 10) -> list[dict[str, Any]]:
        """The most frequent mistakes, (true class, predicted class, photos), most first."""
        n = len(self.labels)
        counts = [
            (int(self.confusion[i, j]), i, j)
            for i in range(n)
            for j in range(n)
            if i != j and self.confusion[i, j]
        ]
        counts.sort(key=lambda c: -c[0])
        return [
            {"true": self.labels[i], "predicted": self.labels[j], "images": k}
            for k, i, j in counts[:most]
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "images": self.total,
            "per_class": self.per_class(),
            "confusion": self.confusion.tolist(),
            "confused": self.confused(),
        }


def score(labels: tuple[str, ...], truth: np.ndarray, predicted: np.ndarray) -> Scores:
    n = len(labels)
    others = bool(np.any(predicted == OTHER))
    confusion = np.zeros((n, n + 1 if others else n), dtype=np.int64)
    for t, p in zip(truth.tolist(), predicted.tolist(), strict=True):
        confusion[t, n if p == OTHER else p] += 1
    return Scores(labels=labels, confusion=confusion)


@dataclass(frozen=True)
class FilePredictions:
    """Top-1 class (folder index, or OTHER) per image that decoded, and the ones that did not."""

    truth: np.ndarray
    predicted: np.ndarray
    skipped: list[tuple[Path, str]]


def open_model(path: Path, threads: int | None = None) -> Classifier:
    """A ``.tflite`` on the plain runtime with the agent's own preprocessing (XNNPACK, CPU)."""
    info = read_model_info(path)
    try:
        interpreter = get_runtime().new_interpreter(
            model_path=str(path), num_threads=threads or os.cpu_count() or 1
        )
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: cannot load model: {str(exc).strip()}") from None
    return Classifier(info, interpreter, delegate={"type": "cpu"})


def label_map(classifier: Classifier, labels: tuple[str, ...]) -> np.ndarray:
    """Model output index to folder class index (OTHER for labels the folder lacks)."""
    names = classifier.info.labels
    if names is None:
        raise UserError(f"{classifier.info.path}: the model has no labels to match folders to")
    offset = 1 if len(names) == classifier.num_classes + 1 else 0
    outputs = list(names[offset:])
    missing = [label for label in labels if label not in outputs]
    if missing:
        raise UserError(
            f"folder class(es) {', '.join(repr(m) for m in missing)} are not labels of "
            f"{classifier.info.path.name} (it knows {len(outputs)}: {', '.join(outputs[:8])}"
            f"{', ...' if len(outputs) > 8 else ''})"
        )
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index.get(name, OTHER) for name in outputs], dtype=np.int64)


def predict_file(
    path: Path,
    data: Dataset,
    threads: int | None = None,
    progress: Progress | None = None,
    noise_seed: int | None = None,
) -> FilePredictions:
    """``noise_seed``: each photo with +-1 grey level of noise added first (a second shot
    of the same scene), to see how firm the model's answers are."""
    classifier = open_model(path, threads)
    rng = np.random.default_rng(noise_seed)
    mapping = label_map(classifier, data.labels)
    truth: list[int] = []
    predicted: list[int] = []
    skipped: list[tuple[Path, str]] = []
    for done, (image_path, target) in enumerate(data.items, 1):
        try:
            image = decode_image(image_path)
        except ValueError as exc:
            skipped.append((image_path, str(exc).removeprefix(f"{image_path}: ")))
        else:
            if noise_seed is not None:
                image = grey_noise(image, rng)
            truth.append(target)
            predicted.append(int(mapping[int(np.argmax(classifier.classify(image)))]))
        if progress is not None:
            progress(done, len(data))
    return FilePredictions(np.array(truth, np.int64), np.array(predicted, np.int64), skipped)
