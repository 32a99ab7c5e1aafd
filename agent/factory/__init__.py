"""The factory model that ships inside the package, so a fresh device classifies at once."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

FACTORY_MODEL_NAME = "efficientnet-lite0-int8.tflite"


def factory_model_path() -> Path:
    """Path of the bundled EfficientNet-Lite0 int8 model."""
    return Path(str(resources.files(__package__).joinpath(FACTORY_MODEL_NAME)))


def recorded_sha256() -> dict[str, str]:
    """The sha256 of every bundled model as written down in ``SHA256SUMS``."""
    text = resources.files(__package__).joinpath("SHA256SUMS").read_text(encoding="utf-8")
    sums: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip()] = digest
    return sums
