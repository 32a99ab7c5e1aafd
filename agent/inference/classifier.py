"""A loaded model: input preparation, inference and top-k, all driven by the model itself.

Input size, dtype and quantization come from the interpreter; normalisation (mean/std)
from the model's embedded metadata, else EfficientNet-Lite's 127/128. Labels come from the
model file (Model Maker style zip), or a labels file, else class indices are reported.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.errors import ModelError
from edgefleet.inference.labels import Label
from edgefleet.inference.litert import Interpreter, InterpreterMaker, quiet_moment
from edgefleet.inference.modelfile import ModelMetadata, is_tflite, read_packed
from edgefleet.inference.preprocess import (
    DEFAULT_CROP,
    DEFAULT_MEAN,
    DEFAULT_STD,
    InputPlan,
    Preprocessor,
)

SUPPORTED_INPUTS = (np.float32, np.uint8, np.int8)


@dataclass(frozen=True)
class ModelInfo:
    """What the agent knows about the model it runs."""

    path: Path
    name: str
    version: int
    sha256: str
    size: int
    trained: bool
    labels: tuple[str, ...] | None
    metadata: ModelMetadata | None
    labels_file: Path | None = None  # where the labels came from, when not the model itself

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "trained": self.trained,
        }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_labels_file(path: Path) -> list[str]:
    """One class name per line, in index order (blank lines skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelError(f"cannot read labels {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ModelError(f"labels {path}: not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_model_info(path: Path, labels_file: Path | None = None) -> ModelInfo:
    """Check the file looks like a model and read its embedded labels and metadata."""
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise ModelError(f"model file not found: {path}") from None
    except OSError as exc:
        raise ModelError(f"cannot read model {path}: {exc.strerror}") from None
    if not is_tflite(head):
        raise ModelError(f"{path}: not a TFLite model (no TFL3 identifier)")
    packed = read_packed(path)
    labels = packed.labels
    if labels_file is not None:
        labels = read_labels_file(labels_file)
    meta = packed.metadata
    return ModelInfo(
        path=path,
        name=meta.name if meta else path.stem,
        version=meta.version if meta else 0,
        sha256=sha256_file(path),
        size=path.stat().st_size,
        trained=meta.trained if meta else True,
        labels=tuple(labels) if labels else None,
        metadata=meta,
        labels_file=labels_file,
    )


class Classifier:
    """One interpreter plus the plan to feed it and read it. Not thread-safe: one loop owns it."""

    def __init__(
        self,
        info: ModelInfo,
        interpreter: Interpreter,
        crop: bool = True,
        delegate: dict[str, Any] | None = None,
    ) -> None:
        self.info = info
        self.interpreter = interpreter
        self.delegate = delegate or {}
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(
                f"{info.path}: expected 1 input and 1 output, got {len(inputs)} and {len(outputs)}"
            )
        self._in = inputs[0]
        self._out = outputs[0]
        self.plan = self._input_plan(crop)
        self.preprocessor = Preprocessor(self.plan)
        self.num_classes = self._check_output()
        out_scale, out_zero = self._out.get("quantization", (0.0, 0))
        quantized = self._out["dtype"] != np.float32
        self._dequant = (float(out_scale), int(out_zero)) if quantized else None

    def _input_plan(self, crop: bool) -> InputPlan:
        shape = tuple(int(d) for d in self._in["shape"])
        dtype = np.dtype(self._in["dtype"])
        if len(shape) != 4 or shape[0] != 1 or shape[3] != 3:
            raise ModelError(
                f"{self.info.path}: unsupported input {list(shape)} {dtype}: "
                "expected [1, height, width, 3] (RGB)"
            )
        if dtype not in SUPPORTED_INPUTS:
            raise ModelError(f"{self.info.path}: unsupported input type {dtype}")
        scale, zero_point = self._in.get("quantization", (0.0, 0))
        if dtype != np.float32 and not scale:
            raise ModelError(f"{self.info.path}: integer input without quantization parameters")
        meta = self.info.metadata
        mean = meta.input.mean if meta else DEFAULT_MEAN
        std = meta.input.std if meta else DEFAULT_STD
        fraction = (meta.input.crop_fraction if meta else DEFAULT_CROP) if crop else None
        return InputPlan(
            height=shape[1],
            width=shape[2],
            dtype=dtype,
            mean=mean,
            std=std,
            scale=float(scale) or 1.0,
            zero_point=int(zero_point),
            crop_fraction=fraction,
        )

    def _check_output(self) -> int:
        shape = [int(d) for d in self._out["shape"]]
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[0] != 1):
            raise ModelError(f"{self.info.path}: unsupported output shape {shape}")
        classes = shape[-1]
        labels = self.info.labels
        if labels is not None and len(labels) not in (classes, classes + 1):
            origin = self.info.labels_file or self.info.path
            raise ModelError(
                f"{origin}: {len(labels)} labels, but the model {self.info.path.name} has "
                f"{classes} output classes"
            )
        return classes

    @property
    def input_shape(self) -> tuple[int, int]:
        return self.plan.height, self.plan.width

    def set_input(self, buffer: np.ndarray) -> None:
        self.interpreter.set_tensor(self._in["index"], buffer)

    def invoke(self) -> np.ndarray:
        """Run the model on the input set last; probabilities as float32."""
        self.interpreter.invoke()
        raw: np.ndarray = np.asarray(self.interpreter.get_tensor(self._out["index"])).reshape(-1)
        if self._dequant is None:
            return raw.astype(np.float32, copy=False)
        scale, zero = self._dequant
        scores: np.ndarray = (raw.astype(np.float32) - zero) * np.float32(scale)
        return scores

    def classify(self, image: np.ndarray) -> np.ndarray:
        """Prepare and run one RGB image (convenience for one-off use, not the hot loop)."""
        buffer = self.preprocessor.new_buffer()
        self.preprocessor(image, buffer)
        self.set_input(buffer)
        return self.invoke()

    def top(self, scores: np.ndarray, k: int, threshold: float = 0.0) -> list[Label]:
        """The ``k`` best classes at or above ``threshold``, best first (per frame: kept cheap,
        one selection and one conversion to Python numbers, no numpy scalar per label)."""
        k = min(k, scores.size)
        best = _top_indices(scores, k)
        labels = self.info.labels
        offset = 1 if labels is not None and len(labels) == self.num_classes + 1 else 0
        out = []
        for i, score in zip(best, scores[best].tolist(), strict=True):
            if score < threshold:
                break
            name = labels[i + offset] if labels is not None else str(i)
            out.append(Label(label=name, index=i, score=min(1.0, max(0.0, score))))
        return out


ARGMAX_TOP_K = 16  # up to this k, k argmax passes; above, one stable sort


def _top_indices(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, best first, ties in index order.

    An int8 model's output has a handful of distinct values and hundreds of equal ones
    (dequantized zeros): partitioning that took 100 us a frame here, k argmax passes take
    3 us for k = 5 with or without ties.
    """
    if k > ARGMAX_TOP_K:
        return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]
    work = scores.astype(np.float32, copy=True)
    best = []
    for _ in range(k):
        i = int(work.argmax())
        best.append(i)
        work[i] = -np.inf
    return best


def load_classifier(
    path: Path,
    delegate: InterpreterMaker,
    labels_file: Path | None = None,
    crop: bool = True,
    info: ModelInfo | None = None,
) -> Classifier:
    """Read, load and check a model with ``delegate``; every failure is a ModelError.

    ``info`` from an earlier ``read_model_info`` of the same file saves hashing it again.
    """
    info = info or read_model_info(path, labels_file)
    try:
        interpreter = delegate.make_interpreter(path)
    except ModelError:
        raise
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: cannot load model: {str(exc).strip()}") from None
    return Classifier(info, interpreter, crop=crop, delegate=delegate.describe())


def load_checked(
    path: Path,
    delegate: InterpreterMaker,
    labels_file: Path | None = None,
    crop: bool = True,
    info: ModelInfo | None = None,
) -> Classifier:
    """``load_classifier``, then one inference on a grey frame: "loads" means "runs here"."""
    classifier = load_classifier(path, delegate, labels_file=labels_file, crop=crop, info=info)
    grey = np.full((*classifier.input_shape, 3), 127, dtype=np.uint8)
    with quiet_moment():
        scores = classifier.classify(grey)
    if not np.all(np.isfinite(scores)):
        raise ModelError(f"{path}: test inference gave non-finite output")
    return classifier


def inspect_model(path: Path) -> Classifier:
    """The model on the plain runtime, no delegate: enough to read its input and classes."""
    from edgefleet.inference.litert import get_runtime

    info = read_model_info(path)
    try:
        interpreter = get_runtime().new_interpreter(model_path=str(path), num_threads=1)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: cannot load model: {str(exc).strip()}") from None
    return Classifier(info, interpreter, delegate={"type": "inspect"})
