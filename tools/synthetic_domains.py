"""Labelled photo folders that look nothing like ImageNet, made from a seed (bench/train.py).

    .venv/bin/python tools/synthetic_domains.py OUT [--per-class 40] [--seed 0] [--domain NAME]

Each domain is a folder of class folders of small PNGs, drawn with numpy and Pillow only:

- ``glyphs``: ten letters that look alike (B C D E F G O P Q R) in Pillow's own font at
  random sizes, places and tilts, ink and paper of random greys, blur and noise (a scan of
  printed characters, 56-96 px);
- ``textures``: gratings in four orientations and two frequencies, jittered so that
  neighbours overlap, faint (contrast 0.06-0.25) under heavy noise (fabric, brushed metal,
  a screen's moire);
- ``shapes``: a disc, square, triangle, ring, cross, bar, pentagon or hexagon, small, in a
  colour near the belt's, turned, among specks of dirt (parts on a conveyor);
- ``thermal``: heat-like blobs in a false-colour ramp, classes by where the heat is (one
  centre spot, two spots, a hot edge, a ring, a diagonal streak, nothing), with a stray
  warm spot and sensor noise;
- ``cells``: a grey microscope-like field of round cells, classes by how many (Poisson
  around 6, 10, 14 or 18: neighbours overlap) and how large, and one with dark nuclei
  (which one in ten cells of the others also shows).

Some classes overlap on purpose: the point is to see the flow on data whose best possible
score is not 100%, next to a reference on the same features. Images are 56 to 160 px and
upscaled by the model's own preprocessing.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

Maker = Callable[[str, np.random.Generator], Image.Image]


def _grey_noise(rng: np.random.Generator, size: int, level: float) -> np.ndarray:
    return rng.normal(0.0, level, (size, size))


def _to_image(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(grey * 255.0, 0, 255).astype(np.uint8), "L")


GLYPHS = ("B", "C", "D", "E", "F", "G", "O", "P", "Q", "R")  # letters that look alike


def glyph(label: str, rng: np.random.Generator) -> Image.Image:
    size = int(rng.integers(56, 97))  # a small scan
    paper = float(rng.uniform(0.5, 0.95))
    ink = paper - float(rng.uniform(0.3, 0.5))
    image = Image.new("L", (size * 2, size * 2), int(paper * 255))
    font = ImageFont.load_default(size=int(size * rng.uniform(0.5, 0.75)))
    draw = ImageDraw.Draw(image)
    box = draw.textbbox((0, 0), label, font=font)
    x = size - (box[0] + box[2]) / 2 + rng.uniform(-0.15, 0.15) * size
    y = size - (box[1] + box[3]) / 2 + rng.uniform(-0.15, 0.15) * size
    draw.text((x, y), label, fill=int(ink * 255), font=font)
    image = image.rotate(float(rng.uniform(-25, 25)), fillcolor=int(paper * 255))
    image = image.crop((size // 2, size // 2, size // 2 + size, size // 2 + size))
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    grey = np.asarray(image, np.float64) / 255.0 + _grey_noise(rng, size, 0.07)
    return _to_image(grey)


# Orientation and cycles per image: neighbours overlap once jittered (+-12 degrees, +-20%).
TEXTURES = {
    f"{name}-{grain}": (angle, cycles)
    for name, angle in (("0deg", 0.0), ("45deg", 45.0), ("90deg", 90.0), ("135deg", 135.0))
    for grain, cycles in (("coarse", 6.0), ("fine", 9.0))
}


def texture(label: str, rng: np.random.Generator) -> Image.Image:
    angle, cycles = TEXTURES[label]
    size = int(rng.integers(96, 161))
    theta = math.radians(angle + rng.uniform(-12, 12))
    yy, xx = np.mgrid[0:size, 0:size] / size
    freq = cycles * rng.uniform(0.8, 1.2)
    wave = np.sin(
        2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + rng.uniform(0, 6.3)
    )
    grey = 0.5 + rng.uniform(0.06, 0.25) * wave + _grey_noise(rng, size, 0.25)
    return _to_image(grey)


SHAPES = ("disc", "square", "triangle", "ring", "cross", "bar", "pentagon", "hexagon")


def shape(label: str, rng: np.random.Generator) -> Image.Image:
    size = int(rng.integers(96, 161))
    background = rng.integers(40, 200, 3)
    noise = rng.normal(0, 18, (size, size, 3))
    noise = rng.normal(0, 30, (size, size, 3))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8), "RGB")
    clutter = ImageDraw.Draw(image)
    for _ in range(4):  # specks of dirt on the belt
        x, y, d = *rng.uniform(0, size, 2), size * rng.uniform(0.02, 0.05)
        clutter.ellipse(
            (x - d, y - d, x + d, y + d), fill=tuple(int(v) for v in rng.integers(0, 256, 3))
        )
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))  # the part alone, turned below
    draw = ImageDraw.Draw(layer)
    tint = rng.integers(-70, 71, 3)  # a part not far from the belt's colour
    colour = (*(int(v) for v in np.clip(background + tint, 0, 255)), 255)
    r = size * rng.uniform(0.1, 0.22)
    cx, cy = size / 2 + rng.uniform(-0.15, 0.15) * size, size / 2 + rng.uniform(-0.15, 0.15) * size
    box = (cx - r, cy - r, cx + r, cy + r)
    if label == "disc":
        draw.ellipse(box, fill=colour)
    elif label == "square":
        draw.rectangle(box, fill=colour)
    elif label == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif label == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 4)))
    elif label == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    elif label in ("pentagon", "hexagon"):
        corners = 5 if label == "pentagon" else 6
        draw.regular_polygon((cx, cy, r), corners, fill=colour)
    else:  # bar
        draw.rectangle((cx - r, cy - r / 5, cx + r, cy + r / 5), fill=colour)
    layer = layer.rotate(float(rng.uniform(0, 360)), center=(cx, cy))
    image.paste(layer, (0, 0), layer)
    return image


HEAT = ("centre-spot", "two-spots", "hot-edge", "ring", "streak", "cold")


def _ramp(heat: np.ndarray) -> Image.Image:
    """A false-colour ramp like a thermal camera's: black, purple, orange, yellow, white."""
    stops = np.array([[0, 0, 0], [90, 10, 120], [230, 90, 20], [250, 220, 40], [255, 255, 255]])
    t = np.clip(heat, 0.0, 1.0) * (len(stops) - 1)
    low = np.floor(t).astype(int).clip(0, len(stops) - 2)
    frac = (t - low)[..., None]
    rgb = stops[low] * (1 - frac) + stops[low + 1] * frac
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def thermal(label: str, rng: np.random.Generator) -> Image.Image:
    size = int(rng.integers(96, 161))
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size

    def spot(x: float, y: float, w: float) -> np.ndarray:
        return np.asarray(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * w * w)))

    def jitter() -> float:
        return float(rng.uniform(-0.1, 0.1))

    w = float(rng.uniform(0.08, 0.14))
    if label == "centre-spot":
        heat = spot(0.5 + jitter(), 0.5 + jitter(), w)
    elif label == "two-spots":
        heat = spot(0.28 + jitter(), 0.5 + jitter(), w) + spot(0.72 + jitter(), 0.5 + jitter(), w)
    elif label == "hot-edge":
        heat = np.exp(-(xx if rng.random() < 0.5 else 1 - xx) / (w * 1.5))
    elif label == "ring":
        radius = np.hypot(xx - 0.5 - jitter() / 2, yy - 0.5 - jitter() / 2)
        heat = np.exp(-((radius - 0.3) ** 2) / (2 * (w / 2.5) ** 2))
    elif label == "streak":
        heat = np.exp(-((xx - yy + jitter()) ** 2) / (2 * (w / 1.5) ** 2))
    else:
        heat = np.zeros((size, size))
    sx, sy = (float(v) for v in rng.uniform(0, 1, 2))
    stray = spot(sx, sy, w * float(rng.uniform(0.5, 1.5)))  # a warm thing passing by
    heat = 0.15 + 0.6 * heat * rng.uniform(0.4, 1.0) + 0.3 * stray * rng.uniform(0, 1)
    heat = heat + _grey_noise(rng, size, 0.12)
    image = _ramp(heat)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image


# Cells per field and their size: neighbouring classes overlap at the edges.
CELLS = (
    "6-small",
    "10-small",
    "14-small",
    "18-small",
    "6-large",
    "10-large",
    "14-large",
    "nucleated",
)


def cells(label: str, rng: np.random.Generator) -> Image.Image:
    size = int(rng.integers(96, 161))
    mean_count = 10 if label == "nucleated" else int(label.split("-", maxsplit=1)[0])
    large = label.endswith("large") or label == "nucleated"
    count = max(1, int(rng.poisson(mean_count)))
    radius = size * (rng.uniform(0.05, 0.08) if large else rng.uniform(0.03, 0.05))
    image = Image.new("L", (size, size), int(rng.uniform(150, 200)))
    draw = ImageDraw.Draw(image)
    for _ in range(count):
        x, y = rng.uniform(0, size, 2)
        r = radius * rng.uniform(0.8, 1.2)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.uniform(90, 130)))
        if label == "nucleated" or rng.random() < 0.1:  # a few others show one too
            n = r * 0.4
            draw.ellipse((x - n, y - n, x + n, y + n), fill=int(rng.uniform(20, 50)))
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    grey = np.asarray(image, np.float64) / 255.0 + _grey_noise(rng, size, 0.08)
    return _to_image(grey)


DOMAINS: dict[str, tuple[tuple[str, ...], Maker]] = {
    "glyphs": (GLYPHS, glyph),
    "textures": (tuple(TEXTURES), texture),
    "shapes": (SHAPES, shape),
    "thermal": (HEAT, thermal),
    "cells": (CELLS, cells),
}


def make(domain: str, out: Path, per_class: int, seed: int) -> Path:
    """``out/<domain>/<class>/<n>.png``; the same seed gives the same pixels."""
    labels, maker = DOMAINS[domain]
    root = out / domain
    for k, label in enumerate(labels):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, k, len(domain)])
        for n in range(per_class):
            maker(label, rng).save(folder / f"{n:03d}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--domain", choices=sorted(DOMAINS), action="append")
    args = parser.parse_args()
    for domain in args.domain or sorted(DOMAINS):
        print(make(domain, args.out, args.per_class, args.seed))


if __name__ == "__main__":
    main()
