"""How a frame becomes a model's input tensor: crop, resize, convert, into a given buffer.

The same bytes on every machine (x86, arm64, armhf): a whole-factor box filter, then OpenCV's
fixed-point bilinear. Per frame on the loop's prepare thread, so every copy counts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

# Resizing one frame is too small to split across cores; OpenCV's own thread pool would
# only compete with the interpreter's threads (XNNPACK's workers wait for the slowest).
cv2.setNumThreads(1)

# Bit-exact bilinear (fixed point, the same bytes on x86, arm64 and armhf); see _shrink.
RESIZE = cv2.INTER_LINEAR_EXACT
# Names the way a frame becomes an input tensor: what caches of inputs or features key on.
PREPROCESSING = "box+bilinear-exact"
DEFAULT_MEAN = 127.0
DEFAULT_STD = 128.0
DEFAULT_CROP = 0.875


@dataclass(frozen=True)
class InputPlan:
    """How one frame becomes one input tensor."""

    height: int
    width: int
    dtype: np.dtype[Any]
    mean: float
    std: float
    scale: float  # input quantization (1.0 / 0 for float inputs)
    zero_point: int
    crop_fraction: float | None  # None: resize the whole frame


class _Scratch(threading.local):
    """Per-thread working images: the loop's prepare thread and a one-off ``classify`` (or a
    re-preparation on the infer thread after a swap) may use one preprocessor at once."""

    def __init__(self, height: int, width: int) -> None:
        self.rgb = np.empty((height, width, 3), dtype=np.uint8)
        self.rgba = np.empty((height, width, 4), dtype=np.uint8)
        self.source: np.ndarray | None = None  # the region in four channels, by its shape

    def four_channels(self, region: np.ndarray) -> np.ndarray:
        shape = (region.shape[0], region.shape[1], 4)
        if self.source is None or self.source.shape != shape:
            self.source = np.empty(shape, dtype=np.uint8)
        cv2.cvtColor(region, cv2.COLOR_RGB2RGBA, dst=self.source)
        return self.source


class Preprocessor:
    """Crop, resize and convert RGB frames into a preallocated input buffer.

    Integer inputs go through a 256-entry lookup table (or nothing at all when the
    model's quantization already matches raw pixels, as the exported int8 models do);
    float inputs get two in-place scalar operations - no per-channel broadcasting.
    """

    def __init__(self, plan: InputPlan) -> None:
        self.plan = plan
        self._scratch = _Scratch(plan.height, plan.width)
        self._lut: np.ndarray | None = None
        self._identity = False
        if plan.dtype != np.float32:
            pixels = np.arange(256, dtype=np.float64)
            q = np.round((pixels - plan.mean) / (plan.std * plan.scale) + plan.zero_point)
            info = np.iinfo(plan.dtype)
            q = np.clip(q, info.min, info.max).astype(plan.dtype)
            self._identity = plan.dtype == np.uint8 and np.array_equal(q, pixels)
            self._lut = q.view(np.uint8).reshape(1, 256)

    def new_buffer(self) -> np.ndarray:
        return np.empty((1, self.plan.height, self.plan.width, 3), dtype=self.plan.dtype)

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of the region that is resized into the input."""
        fraction = self.plan.crop_fraction
        if fraction is None:
            return 0, height, 0, width
        # Square crop of the short side's centre: the EfficientNet eval transform.
        side = max(1, round(min(height, width) * fraction))
        y0 = (height - side) // 2
        x0 = (width - side) // 2
        return y0, y0 + side, x0, x0 + side

    def _shrink(self, region: np.ndarray) -> np.ndarray:
        """Box-filter by the largest whole factor first: anti-aliased and cheap.

        OpenCV's INTER_AREA is fast only for whole factors (1.9 ms for 420->224 here, 0.1 ms
        for 420->210); the remaining factor below 2 is left to bilinear resizing. Both steps
        give the same bytes on every machine: the whole-factor box filter, and bilinear in
        OpenCV's fixed-point ``INTER_LINEAR_EXACT`` (its SIMD ``INTER_LINEAR`` rounds
        differently on ARM: 12-22% of an input tensor's values off by one on aarch64), so
        a photo's input tensor on a Pi is the one the operator's machine computed.
        """
        factor = min(region.shape[0] // self.plan.height, region.shape[1] // self.plan.width)
        if factor < 2:
            return region
        h = region.shape[0] // factor * factor
        w = region.shape[1] // factor * factor
        small: np.ndarray = cv2.resize(
            region[:h, :w], (w // factor, h // factor), interpolation=cv2.INTER_AREA
        )
        return small

    def _resize(self, region: np.ndarray, out: np.ndarray) -> None:
        """Bilinear into ``out`` (HxWx3 uint8), through four channels.

        OpenCV's bit-exact bilinear has vector code for four channels only: adding a fourth
        channel, resizing and dropping it gives the same bytes as resizing three (each
        channel is interpolated alone) in less time: ``bench/preprocess.py``, docs/performance.md.
        """
        size = (self.plan.width, self.plan.height)
        if region.shape[:2] == out.shape[:2]:
            cv2.resize(region, size, dst=out, interpolation=RESIZE)  # the model's size: a copy
            return
        scratch = self._scratch
        cv2.resize(scratch.four_channels(region), size, dst=scratch.rgba, interpolation=RESIZE)
        cv2.cvtColor(scratch.rgba, cv2.COLOR_RGBA2RGB, dst=out)

    def __call__(self, image: np.ndarray, out: np.ndarray) -> None:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB frame, got {image.shape} {image.dtype}")
        y0, y1, x0, x1 = self.crop_box(image.shape[0], image.shape[1])
        region = self._shrink(image[y0:y1, x0:x1])
        target = out[0]
        if self._identity:
            self._resize(region, target)
            return
        rgb = self._scratch.rgb
        self._resize(region, rgb)
        if self._lut is not None:
            cv2.LUT(rgb, self._lut, dst=target.view(np.uint8))
            return
        np.multiply(rgb, np.float32(1.0 / self.plan.std), out=target, dtype=np.float32)
        np.subtract(target, np.float32(self.plan.mean / self.plan.std), out=target)
