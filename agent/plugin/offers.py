"""What a source plugin offers when the config says ``source: {type: auto}``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SourceOffer:
    """A source this device could use: a ready config section, a score and why.

    Scores: 100 a dedicated camera (Pi camera module), 80 a V4L2 camera, 10 a file or
    synthetic fallback. The highest score wins.
    """

    section: dict[str, Any]
    score: int
    reason: str
