"""Deterministic generated frames: the default for tests and benchmarks."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from edgefleet.plugin import hookimpl
from edgefleet.plugin.offers import SourceOffer
from edgefleet.plugin.registry import PluginConfig, Registry
from edgefleet.runtime.sources import EndOfStream, Source, ThreadedSource


class SyntheticConfig(PluginConfig):
    """``source: {type: synthetic}``: moving gradients, identical for the same seed."""

    type: Literal["synthetic"] = "synthetic"
    width: int = Field(default=640, ge=8, le=8192)
    height: int = Field(default=480, ge=8, le=8192)
    fps: float | None = Field(default=30.0, gt=0, description="null = as fast as consumed")
    frames: int | None = Field(default=None, ge=1, description="stop after this many")
    seed: int = 0
    variants: int = Field(default=8, ge=1, le=256, description="distinct frames in the cycle")


def _level(channel: np.ndarray) -> np.ndarray:
    """[-1, 1] -> [0, 255] (assigned into a uint8 frame: truncated, as ``astype`` does)."""
    result: np.ndarray = ((channel + 1.0) * 127.5).clip(0, 255)
    return result


class SyntheticSource(ThreadedSource):
    def __init__(self, config: SyntheticConfig) -> None:
        super().__init__("synthetic", fps=config.fps)
        self.config = config
        self._frames: list[np.ndarray] = []
        self._n = 0

    def open(self) -> None:
        if self._frames:
            return
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        ys = np.linspace(0, 1, cfg.height, dtype=np.float32)[:, None]
        xs = np.linspace(0, 1, cfg.width, dtype=np.float32)[None, :]
        for _ in range(cfg.variants):
            a, b, c = rng.uniform(0.5, 6.0, 3)
            phase = rng.uniform(0, 2 * np.pi, 3)
            # One channel at a time, straight into the uint8 frame: the float temporaries of
            # a whole frame would be most of the agent's peak memory at start.
            img = np.empty((cfg.height, cfg.width, 3), dtype=np.uint8)
            img[..., 0] = _level(np.sin(a * xs * np.pi + phase[0]) * np.cos(b * ys * np.pi))
            img[..., 1] = _level(np.sin(b * ys * np.pi + phase[1]) + 0 * xs)
            img[..., 2] = _level(np.cos(c * (xs + ys) * np.pi + phase[2]))
            self._frames.append(img)

    def read(self) -> tuple[np.ndarray, str]:
        if self.config.frames is not None and self._n >= self.config.frames:
            raise EndOfStream
        frame = self._frames[self._n % len(self._frames)]
        self._n += 1
        return frame, f"synthetic:{(self._n - 1) % len(self._frames)}"


@hookimpl
def edgefleet_register_sources(registry: Registry[Source]) -> None:
    registry.add("synthetic", SyntheticConfig, SyntheticSource, "generated test frames")


@hookimpl
def edgefleet_offer_sources() -> list[SourceOffer]:
    return [SourceOffer({"type": "synthetic"}, 1, "always available (generated frames)")]
