"""What a classifier answers: a label with its class index and score (no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Label:
    """One of the top-k classes (results carry them: ``edgefleet.runtime.results``)."""

    label: str
    index: int
    score: float
