"""Public-domain / CC0 sample photos used by ``edgefleet demo`` (see ATTRIBUTION.md)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def sample_dir() -> Path:
    """Folder holding the bundled sample photos."""
    return Path(str(resources.files(__package__)))


def sample_photos() -> list[Path]:
    """The bundled photos, sorted by name."""
    return sorted(sample_dir().glob("*.jpg"))
