"""Model files with their labels and preprocessing inside (TFLite Model Maker style).

A packed model is a valid ``.tflite`` flatbuffer with a zip archive appended. The
TFLite runtime ignores the trailing bytes; a zip reader finds the archive from its end.
The archive holds ``labels.txt`` (one class name per line, index order) and
``edgefleet.json`` (the sidecar described by :class:`ModelMetadata`).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.errors import ModelError

LABELS_NAME = "labels.txt"
SIDECAR_NAME = "edgefleet.json"
TFLITE_IDENTIFIER = b"TFL3"
# Fixed zip timestamp so that the same inputs give byte-identical files.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class InputSpec(BaseModel):
    """How raw RGB pixels become the model's input tensor."""

    model_config = ConfigDict(extra="forbid")

    height: int = Field(gt=0)
    width: int = Field(gt=0)
    mean: float = 127.0
    std: float = Field(default=128.0, gt=0)
    crop_fraction: float = Field(default=0.875, gt=0, le=1)
    color: Literal["RGB"] = "RGB"


class ModelMetadata(BaseModel):
    """The sidecar the export tool writes into every model it makes."""

    model_config = ConfigDict(extra="forbid")

    name: str
    variant: str
    version: int = Field(default=0, ge=0)
    trained: bool = True
    input: InputSpec
    labels_file: str | None = LABELS_NAME
    source: dict[str, str] = Field(default_factory=dict)


def is_tflite(head: bytes) -> bool:
    """True when the bytes start like a TFLite flatbuffer (identifier at offset 4)."""
    return len(head) >= 8 and head[4:8] == TFLITE_IDENTIFIER


def pack(tflite: bytes, labels: list[str] | None, metadata: ModelMetadata) -> bytes:
    """Append a deterministic zip with labels and the sidecar to a flatbuffer."""
    if not is_tflite(tflite):
        raise ModelError("not a TFLite flatbuffer (identifier TFL3 missing)")
    buf = io.BytesIO()
    buf.write(tflite)
    with zipfile.ZipFile(buf, mode="a", compression=zipfile.ZIP_STORED) as zf:
        if labels is not None:
            _add(zf, LABELS_NAME, "".join(f"{label}\n" for label in labels).encode())
        sidecar = metadata.model_dump(mode="json")
        _add(zf, SIDECAR_NAME, json.dumps(sidecar, indent=2, sort_keys=True).encode() + b"\n")
    return buf.getvalue()


def _add(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


class PackedContents(BaseModel):
    """What could be read from a model file's embedded archive."""

    labels: list[str] | None = None
    metadata: ModelMetadata | None = None


def read_packed(path: Path) -> PackedContents:
    """Read labels and sidecar from a model file; a plain ``.tflite`` gives empty contents."""
    try:
        if not zipfile.is_zipfile(path):
            return PackedContents()
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            labels = _read_labels(zf, names)
            metadata = None
            if SIDECAR_NAME in names:
                metadata = ModelMetadata.model_validate_json(zf.read(SIDECAR_NAME))
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: embedded archive unreadable: {exc}") from exc
    except ValidationError as exc:
        raise ModelError(f"{path}: {SIDECAR_NAME} invalid: {exc.errors()[0]['msg']}") from exc
    return PackedContents(labels=labels, metadata=metadata)


def _read_labels(zf: zipfile.ZipFile, names: list[str]) -> list[str] | None:
    # Model Maker files name their label file freely; take labels.txt, else the first .txt.
    candidates = (
        [LABELS_NAME] if LABELS_NAME in names else sorted(n for n in names if n.endswith(".txt"))
    )
    if not candidates:
        return None
    text = zf.read(candidates[0]).decode("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
