"""``edgefleet models train``: a folder in, two models and a report out.

Split (test, then validation, both stratified and seeded; photos with the same bytes kept
together) -> features and head (``train``) -> export (fp32 + int8) -> both files scored on
the test split exactly as the agent runs them -> the gates (``gates``) -> ``report.json``.
The report is what the CLI prints; nothing is scored twice. The deploy line is in it only
when the gates passed, or when ``force`` is set (and then it says so).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.errors import UserError
from edgefleet.fsutil import atomic_write_bytes
from edgefleet.inference.classifier import sha256_file
from edgefleet.training.dataset import Dataset, image_folder
from edgefleet.training.evaluate import predict_file, score
from edgefleet.training.gates import judge
from edgefleet.training.model import Calibration, train
from edgefleet.training.progress import Stage, step_of

REPORT_NAME = "report.json"


@dataclass(frozen=True)
class Plan:
    """Everything ``models train`` was asked for."""

    data: Path
    out: Path
    name: str
    base: str = "lite0"
    version: int = 1
    validation_split: float = 0.1
    test_split: float = 0.1
    augment: bool = False
    fine_tune: int = 0  # epochs of training the last block too; 0: head only
    seed: int = 0
    cache: Path | None = None
    min_accuracy: float | None = None  # the int8 file's least test top-1, when set
    force: bool = False  # offer the deploy line even when a gate refused the model
    calibration: Calibration = "data"  # int8 ranges from the training photos, or the base's


def split(data: Dataset, plan: Plan) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """(train, validation, test): each fraction of the whole folder, per class."""
    for flag, value in (("validation", plan.validation_split), ("test", plan.test_split)):
        if not 0.0 <= value < 1.0:
            raise UserError(f"--{flag}-split must be at least 0 and below 1, got {value}")
    if plan.validation_split + plan.test_split >= 1.0:
        raise UserError("--validation-split and --test-split leave no training images")
    rest, test = data, None
    if plan.test_split:
        rest, test = data.split(1.0 - plan.test_split, plan.seed)
    validation = None
    if plan.validation_split:
        share = plan.validation_split / (1.0 - plan.test_split)
        rest, validation = rest.split(1.0 - share, plan.seed + 1)
    return rest, validation, test


def run(plan: Plan, stage: Stage | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    data = image_folder(plan.data)
    train_data, validation, test = split(data, plan)
    duplicates = data.duplicates()
    model = train(
        train_data,
        base=plan.base,
        augment=plan.augment,
        seed=plan.seed,
        validation=validation,
        cache=plan.cache,
        stage=stage,
        fine_tune_epochs=plan.fine_tune,
        calibration=plan.calibration,
    )
    exported = model.export(plan.out, plan.name, stage, version=plan.version)
    seconds = {**model.seconds, **exported.seconds}
    report: dict[str, Any] = {
        "name": plan.name,
        "version": plan.version,
        "base": plan.base,
        "labels": list(data.labels),
        "data": str(plan.data),
        "seed": plan.seed,
        "validation_split": plan.validation_split,
        "test_split": plan.test_split,
        "augment": plan.augment,
        "fine_tune": plan.fine_tune,
        "calibration": plan.calibration,
        "splits": {
            "train": train_data.counts(),
            "validation": validation.counts() if validation else {},
            "test": test.counts() if test else {},
        },
        "skipped": [{"path": str(p), "reason": r} for p, r in model.skipped],
        "duplicates": _duplicates(duplicates),
        "head": {
            **model.head.fit,
            "class_weights": dict(zip(data.labels, model.head.class_weights, strict=True)),
            "variant": model.choice["chosen"],
            "why": model.choice["why"],
            "trials": model.choice["trials"],
        },
        "history": model.head.history,
        "files": {
            kind: {"path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}
            for kind, path in (("fp32", exported.fp32), ("int8", exported.int8))
        },
    }
    if test is not None:
        evaluated = time.perf_counter()
        report["test"] = _scores(exported.fp32, exported.int8, test, stage)
        seconds["evaluate"] = time.perf_counter() - evaluated
    seconds["total"] = time.perf_counter() - started
    report["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    report["gates"] = judge(report.get("test"), plan.min_accuracy)
    offered = report["gates"]["passed"] or plan.force
    report["forced"] = plan.force and not report["gates"]["passed"]
    report["deploy"] = deploy_command(exported.int8, plan.name, plan.version) if offered else None
    atomic_write_bytes(plan.out / REPORT_NAME, (json.dumps(report, indent=2) + "\n").encode())
    return report


def _scores(fp32: Path, int8: Path, test: Dataset, stage: Stage | None) -> dict[str, Any]:
    runs = {
        kind: predict_file(path, test, progress=step_of(stage, f"test {kind}"))
        for kind, path in (("fp32", fp32), ("int8", int8))
    }
    noisy = predict_file(fp32, test, progress=step_of(stage, "test fp32, noise"), noise_seed=0)
    both = runs["fp32"].predicted, runs["int8"].predicted
    return {
        "fp32": score(test.labels, runs["fp32"].truth, runs["fp32"].predicted).as_dict(),
        "int8": score(test.labels, runs["int8"].truth, runs["int8"].predicted).as_dict(),
        "int8_agreement": _agreement(*both),
        # How firm the fp32 file's own answers are: the most int8 can be expected to keep.
        "fp32_noise_agreement": _agreement(both[0], noisy.predicted),
        "skipped": len(runs["fp32"].skipped),
    }


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b)) if len(a) else 0.0


def _duplicates(groups: list[list[tuple[Path, str]]]) -> dict[str, Any]:
    """Photos with the same bytes: how many, and those filed under more than one class."""
    conflicts = [g for g in groups if len({label for _, label in g}) > 1]
    return {
        "groups": len(groups),
        "files": sum(len(g) for g in groups),
        "across_classes": [[{"path": str(p), "class": c} for p, c in g] for g in conflicts],
    }


def deploy_command(model: Path, name: str, version: int) -> str:
    return (
        f"edgefleet rollout publish {model} --name {name} --version {version} "
        "--target fleet --key release.key"
    )
