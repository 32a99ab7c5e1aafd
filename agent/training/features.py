"""The frozen backbone, run once per image: 1280-d features cached on disk.

Model Maker's default trains only the classification head, so the backbone's output for an
image never changes between epochs or runs. It is computed with LiteRT on a float ``.tflite``
of the backbone (converted once per base model and kept in the cache folder, keyed by what
built it) with exactly the preprocessing the agent applies at inference, and kept per image
file content, so training again (other epochs, other split) costs no backbone pass at all.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.errors import UserError
from edgefleet.fsutil import atomic_write_bytes
from edgefleet.inference.images import decode_image
from edgefleet.inference.litert import get_runtime
from edgefleet.inference.preprocess import PREPROCESSING, InputPlan, Preprocessor
from edgefleet.training.convert import (
    CROP_FRACTION,
    FEATURES,
    INSTALL_HINT,
    MEAN,
    PRETRAINED,
    SIZES,
    STD,
    convert_fp32,
    efficientnet,
    output_folder,
    require,
    weights_package,
)

# Bump when the backbone graph or the feature preprocessing changes: old caches then miss.
FEATURE_FORMAT = 1
Progress = Callable[[int, int], None]


def cache_root(override: Path | None = None) -> Path:
    """``override``, else ``$XDG_CACHE_HOME/edgefleet``, else ``~/.cache/edgefleet``."""
    if override is not None:
        return override
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefleet"


def parse_base(text: str) -> int:
    """``lite0``/``lite1``/``lite2`` to its level; the others ship no pretrained weights."""
    allowed = [f"lite{n}" for n in sorted(PRETRAINED)]
    if text not in allowed:
        raise UserError(f"unknown base {text!r}: use one of {', '.join(allowed)}")
    return int(text.removeprefix("lite"))


def backbone_module(level: int) -> Any:
    """The pretrained network up to its pooled features, NHWC in, in ``eval()`` mode."""
    torch = require("torch", "torch==2.13.0")
    litert_torch = require("litert_torch", "litert-torch")
    net = efficientnet(level, pretrained=True)

    class Backbone(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            return self.inner._avg_pooling(self.inner.extract_features(x)).flatten(1)

    Backbone.__module__ = "edgefleet_backbone"
    Backbone.__qualname__ = "Backbone"
    return litert_torch.to_channel_last_io(Backbone(net).eval(), args=[0])


def backbone_key(level: int) -> str:
    """What the backbone file depends on: weights, converter, torch, our format."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        converters = [f"{name}=={version(name)}" for name in ("torch", "litert-torch")]
    except PackageNotFoundError as exc:
        raise UserError(f"missing package {exc.name}: {INSTALL_HINT}") from None
    parts = [weights_package(level), *converters, f"format={FEATURE_FORMAT}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def backbone_file(level: int, cache: Path) -> Path:
    """The backbone ``.tflite``, converted on first use and then read from the cache."""
    path = cache / "backbones" / f"efficientnet-lite{level}-{backbone_key(level)}.tflite"
    if not path.exists():
        try:
            output_folder(path.parent)  # before a conversion that would be lost
        except UserError as exc:
            raise UserError(f"cache: {exc} (--cache sets another folder)") from None
        atomic_write_bytes(path, convert_fp32(backbone_module(level), SIZES[level]))
    return path


@dataclass(frozen=True)
class View:
    """How one image becomes one backbone input: the centre crop, or a random one; either
    with +-1 grey level of noise on top (``noise``: the n-th draw, seeded by content)."""

    augment: int  # 0: the agent's own centre crop; n > 0: the n-th random crop of this seed
    seed: int = 0
    noise: int = 0

    @property
    def tag(self) -> str:
        tag = "c" if self.augment == 0 else f"a{self.seed}-{self.augment}"
        return f"{tag}-n{self.noise}" if self.noise else tag


CENTRE = View(0)
NOISY = View(0, noise=1)  # the centre crop as a second shot of the same scene would give it


def random_view(image: np.ndarray, view: View, digest: str) -> np.ndarray:
    """A random crop (area 35-100%, aspect 3/4-4/3) with a coin-flip mirror, seeded by the
    image's content, the seed and the view number: the same view of a file every run."""
    seed = int(digest[:8], 16) ^ (view.seed * 1_000_003) ^ (view.augment * 7919)
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    area = rng.uniform(0.35, 1.0) * h * w
    aspect = rng.uniform(3 / 4, 4 / 3)
    cw = max(1, int(min(w, np.sqrt(area * aspect))))
    ch = max(1, int(min(h, np.sqrt(area / aspect))))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    crop = image[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


@dataclass
class FeatureSet:
    """Features of the images that decoded; ``skipped`` names the ones that did not."""

    features: np.ndarray  # (n, 1280) float32
    targets: np.ndarray  # (n,) int64
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


class Extractor:
    """Backbone features of image files, from the cache when it holds them."""

    def __init__(
        self,
        level: int,
        cache: Path | None = None,
        threads: int | None = None,
        backbone: Path | None = None,
    ) -> None:
        """``backbone``: another backbone file than the float one (the int8 backbone of
        ``robust``: uint8 input, quantized output, both handled as the agent handles them)."""
        self.level = level
        root = self.root = cache_root(cache)
        self.model_path = backbone or backbone_file(level, root)
        # Features depend on the backbone and on how a photo became its input tensor.
        self.cache_dir = root / "features" / f"{self.model_path.stem}-{PREPROCESSING}"
        self._interpreter = get_runtime().new_interpreter(
            model_path=str(self.model_path), num_threads=threads or os.cpu_count() or 1
        )
        self._interpreter.allocate_tensors()
        given = self._interpreter.get_input_details()[0]
        made = self._interpreter.get_output_details()[0]
        self._in, self._out = given["index"], made["index"]
        scale, zero = made["quantization"]
        self._dequantize = (float(scale), int(zero)) if scale else None
        size = SIZES[level]
        self._centre = Preprocessor(_plan(size, CROP_FRACTION, given))
        self._whole = Preprocessor(_plan(size, None, given))
        self.hits = 0
        self.misses = 0

    def extract(
        self,
        items: list[tuple[Path, int]],
        views: tuple[View, ...] = (CENTRE,),
        progress: Progress | None = None,
    ) -> FeatureSet:
        """One row per (decodable image, view); unreadable images are skipped and named."""
        rows: list[np.ndarray] = []
        targets: list[int] = []
        paths: list[Path] = []
        skipped: list[tuple[Path, str]] = []
        for done, (path, target, result) in enumerate(self._prepared(items, views), 1):
            if isinstance(result, str):
                skipped.append((path, result))
            else:
                rows += list(result)
                targets += [target] * len(result)
                paths += [path] * len(result)
            if progress is not None:
                progress(done, len(items))
        features = np.stack(rows) if rows else np.empty((0, FEATURES), np.float32)
        return FeatureSet(features, np.array(targets, np.int64), paths, skipped)

    def _prepared(
        self, items: list[tuple[Path, int]], views: tuple[View, ...]
    ) -> Iterator[tuple[Path, int, np.ndarray | str]]:
        # Decoding (OpenCV, outside the GIL) of the next image overlaps this one's inference.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
            pending = [pool.submit(self._load, path, views) for path, _ in items[:2]]
            for i, (path, target) in enumerate(items):
                if i + 2 < len(items):
                    pending.append(pool.submit(self._load, items[i + 2][0], views))
                loaded = pending[i].result()
                if isinstance(loaded, str):
                    yield path, target, loaded
                    continue
                yield path, target, self._features(*loaded)

    def _load(
        self, path: Path, views: tuple[View, ...]
    ) -> tuple[str, tuple[View, ...], list[np.ndarray | None], np.ndarray | None] | str:
        """The cached rows of ``path``; the decoded image too when any view is missing."""
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            return f"cannot read: {exc.strerror}"
        cached = [self._cached(digest, view) for view in views]
        if all(row is not None for row in cached):
            return digest, views, cached, None
        try:
            image = decode_image(path)
        except ValueError as exc:
            return str(exc).removeprefix(f"{path}: ")
        return digest, views, cached, image

    def _features(
        self,
        digest: str,
        views: tuple[View, ...],
        cached: list[np.ndarray | None],
        image: np.ndarray | None,
    ) -> np.ndarray:
        rows = []
        for view, stored in zip(views, cached, strict=True):
            row = stored
            if row is None:
                if image is None:  # _load decodes whenever a view is missing
                    raise RuntimeError(f"no image for the uncached view {view.tag}")
                row = self._run(image, view, digest)
                self._store(digest, view, row)
                self.misses += 1
            else:
                self.hits += 1
            rows.append(row)
        return np.stack(rows)

    def prepared(
        self, items: list[tuple[Path, int]], views: tuple[View, ...] = (CENTRE,), batch: int = 16
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches of preprocessed inputs (N, H, W, 3 float) and their targets, for a network
        run outside LiteRT (fine-tuning); photos that do not decode are left out."""
        inputs: list[np.ndarray] = []
        targets: list[int] = []
        for path, target in items:
            try:
                data = path.read_bytes()
                image = decode_image(path)
            except (OSError, ValueError):
                continue  # skipped and counted when features were extracted
            digest = hashlib.sha256(data).hexdigest()
            for view in views:
                inputs.append(self._input(image, view, digest)[0])
                targets.append(target)
            if len(inputs) >= batch:
                yield np.stack(inputs), np.array(targets, np.int64)
                inputs, targets = [], []
        if inputs:
            yield np.stack(inputs), np.array(targets, np.int64)

    def _input(self, image: np.ndarray, view: View, digest: str) -> np.ndarray:
        buffer = self._centre.new_buffer()
        if view.augment == 0:
            self._centre(image, buffer)
        else:
            self._whole(random_view(image, view, digest), buffer)
        if view.noise:
            _add_noise(buffer, int(digest[:8], 16) ^ (view.noise * 104_729))
        return buffer

    def _run(self, image: np.ndarray, view: View, digest: str) -> np.ndarray:
        buffer = self._input(image, view, digest)
        self._interpreter.set_tensor(self._in, buffer)
        self._interpreter.invoke()
        row: np.ndarray = self._interpreter.get_tensor(self._out).reshape(-1).astype(np.float32)
        if self._dequantize is not None:
            scale, zero = self._dequantize
            row = (row - zero) * np.float32(scale)
        return row

    def _entry(self, digest: str, view: View) -> Path:
        return self.cache_dir / digest[:2] / f"{digest}-{view.tag}.npy"

    def _cached(self, digest: str, view: View) -> np.ndarray | None:
        try:
            row: np.ndarray = np.load(self._entry(digest, view), allow_pickle=False)
        except (OSError, ValueError):
            return None  # absent, or a torn write from an interrupted run: computed again
        return row if row.shape == (FEATURES,) and row.dtype == np.float32 else None

    def _store(self, digest: str, view: View, row: np.ndarray) -> None:
        entry = self._entry(digest, view)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(entry, _npy_bytes(row), durable=False)
        except OSError:
            pass  # a full or read-only cache costs the next run a recomputation, nothing else


def _npy_bytes(row: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, row, allow_pickle=False)
    return buf.getvalue()


def grey_noise(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``pixels`` (uint8) with +-1 grey level drawn uniformly per value, kept in 0..255."""
    step = rng.integers(-1, 2, pixels.shape)
    noisy: np.ndarray = np.clip(pixels.astype(np.int16) + step, 0, 255).astype(np.uint8)
    return noisy


def _add_noise(buffer: np.ndarray, seed: int) -> None:
    """``grey_noise`` in the buffer's own units (raw pixels, or normalised floats)."""
    rng = np.random.default_rng(seed)
    if buffer.dtype == np.uint8:
        buffer[...] = grey_noise(buffer, rng)
    else:
        buffer += (rng.integers(-1, 2, buffer.shape) / STD).astype(buffer.dtype)


def _plan(size: int, crop: float | None, given: dict[str, Any]) -> InputPlan:
    """The agent's preprocessing for the backbone's input (float, or uint8 raw pixels)."""
    dtype = np.dtype(given["dtype"])
    scale, zero = given["quantization"] if dtype != np.float32 else (1.0, 0)
    return InputPlan(
        height=size,
        width=size,
        dtype=dtype,
        mean=MEAN,
        std=STD,
        scale=float(scale),
        zero_point=int(zero),
        crop_fraction=crop,
    )


def model_sized(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` as the int8 model's input: the agent's centre crop and resize, raw pixels
    (mean 127, std 128 at scale 1/128, zero point 127 is the identity). For calibration."""
    pre = Preprocessor(
        InputPlan(size, size, np.dtype(np.uint8), MEAN, STD, 1 / STD, int(MEAN), CROP_FRACTION)
    )
    buffer = pre.new_buffer()
    pre(image, buffer)
    pixels: np.ndarray = buffer[0]
    return pixels
