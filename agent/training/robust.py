"""A head that the fp32 and the int8 file answer alike with, where the plain one does not.

On photos unlike ImageNet the backbone's features of two neighbouring classes differ
little, and the int8 backbone's rounding moves them about as much: the plain head, fitted on
the float features alone, leans on directions that rounding blurs, and the int8 file changes
6-20% of its answers (docs/models.md). Neither the dense layer's own rounding nor the
activations' is the cause: with the head in float, or with 16-bit activations, as many
answers change, because each int8 weight of the backbone moves the features a little.

The robust head learns each training photo three times: the float backbone's features, the
int8 backbone's features (the very backbone the int8 file will hold: quantized on the same
calibration photos, so its features equal those inside the int8 file) and the float
features of the photo with +-1 grey level of noise. It must answer alike whichever it sees,
so it leans on what survives the rounding. Both files are exported with the head chosen.

``choose`` fits it only when int8 keeps fewer than ``MIN_AGREEMENT`` of the plain head's
answers on the validation photos, and keeps it only when, on those photos (out of sample),
it agrees more without scoring lower in int8; the report shows both and why.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgefleet.fsutil import atomic_write_bytes
from edgefleet.training.convert import quantize_int8
from edgefleet.training.features import NOISY, Extractor, FeatureSet, View
from edgefleet.training.gates import MIN_AGREEMENT
from edgefleet.training.head import Head, train_head
from edgefleet.training.progress import Stage, step_of

Items = list[tuple[Path, int]]


class FeatureSource(Protocol):
    """Backbone features of photos (``features.Extractor``, float or int8)."""

    def extract(
        self,
        items: Items,
        views: tuple[View, ...] = ...,
        progress: Callable[[int, int], None] | None = None,
    ) -> FeatureSet: ...


@dataclass(frozen=True)
class Trial:
    """A head's answers on the validation photos, from the fit that never saw them."""

    variant: str
    l2: float
    fp32: float  # top-1 on the float backbone's features (what the fp32 file answers)
    int8: float  # top-1 on the int8 backbone's features (what the int8 file answers)
    agreement: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "l2": self.l2,
            "validation_fp32": self.fp32,
            "validation_int8": self.int8,
            "validation_agreement": self.agreement,
        }


def int8_backbone(extractor: Extractor, crops: Iterable[np.ndarray]) -> Path:
    """The float backbone quantized on ``crops`` (those the int8 file is calibrated on),
    kept beside it in the cache under the crops' digest; in a temporary file when the cache
    cannot take it."""
    chosen = list(crops)
    digest = hashlib.sha256()
    for crop in chosen:
        digest.update(repr(crop.shape).encode())
        digest.update(np.ascontiguousarray(crop).tobytes())
    float_path = extractor.model_path
    path = float_path.with_name(f"{float_path.stem}-int8-{digest.hexdigest()[:16]}.tflite")
    if path.exists():
        return path
    model = quantize_int8(float_path.read_bytes(), chosen)
    try:
        atomic_write_bytes(path, model, durable=False)
    except OSError:  # full or read-only cache: this run still gets its backbone
        with tempfile.NamedTemporaryFile(suffix=".tflite", delete=False) as spare:
            spare.write(model)
        return Path(spare.name)
    return path


def trial(variant: str, head: Head, fp32: FeatureSet, int8: FeatureSet) -> Trial:
    """``head`` (its fit on the training split alone) scored on validation features."""
    checked = head.checked or head
    a, b = checked.predict(fp32.features), checked.predict(int8.features)
    y = fp32.targets
    return Trial(
        variant=variant,
        l2=float(head.fit["l2"]),
        fp32=float(np.mean(a == y)),
        int8=float(np.mean(b == y)),
        agreement=float(np.mean(a == b)),
    )


def choose(
    plain: Head,
    fit: FeatureSet,
    val_f: FeatureSet,
    train_items: Items,
    views: tuple[View, ...],
    extractors: tuple[FeatureSource, FeatureSource],
    stage: Stage | None = None,
) -> tuple[Head, dict[str, Any]]:
    """The plain head, or the robust one where it keeps the int8 file's answers better
    (module docstring); with ``{"chosen", "why", "trials"}`` for the report. ``fit`` and
    ``val_f``: the float features the plain head was fitted and checked on (centre views)."""
    floats, ints = extractors
    validation_items = [(path, int(t)) for path, t in zip(val_f.paths, val_f.targets, strict=True)]
    if not validation_items:
        why = "not tried: no validation photo could be read (the heads are compared on them)"
        return plain, {"chosen": "plain", "why": why, "trials": []}
    val_q = ints.extract(validation_items, progress=step_of(stage, "int8 features (validation)"))
    first = trial("plain", plain, val_f, val_q)
    if first.agreement >= MIN_AGREEMENT:
        why = (
            f"int8 keeps {first.agreement:.1%} of the plain head's answers on the validation "
            f"photos (at least {MIN_AGREEMENT:.0%}): the robust head was not needed"
        )
        return plain, {"chosen": "plain", "why": why, "trials": [first.as_dict()]}
    q = ints.extract(train_items, views, step_of(stage, "int8 features"))
    n = floats.extract(train_items, (NOISY,), step_of(stage, "noisy features"))
    val_n = floats.extract(validation_items, (NOISY,))
    robust = train_head(
        np.concatenate([fit.features, q.features, n.features]),
        np.concatenate([fit.targets, q.targets, n.targets]),
        plain.weight.shape[0],
        (
            np.concatenate([val_f.features, val_q.features, val_n.features]),
            np.concatenate([val_f.targets, val_q.targets, val_n.targets]),
        ),
        step_of(stage, "train robust head"),
    )
    robust.fit["fitted_on"] = plain.fit["fitted_on"]
    robust.fit["rows_per_photo"] = 3
    second = trial("robust", robust, val_f, val_q)
    trials = [first.as_dict(), second.as_dict()]
    kept = second.agreement > first.agreement and second.int8 >= first.int8
    if kept:
        why = (
            f"int8 kept {first.agreement:.1%} of the plain head's answers on the validation "
            f"photos and {second.agreement:.1%} of the robust head's (int8 top-1 "
            f"{first.int8:.1%} -> {second.int8:.1%})"
        )
        return robust, {"chosen": "robust", "why": why, "trials": trials}
    why = (
        f"int8 kept {first.agreement:.1%} of the plain head's answers on the validation photos; "
        f"the robust head did not do better ({second.agreement:.1%}, int8 top-1 "
        f"{second.int8:.1%} against {first.int8:.1%})"
    )
    return plain, {"chosen": "plain", "why": why, "trials": trials}
