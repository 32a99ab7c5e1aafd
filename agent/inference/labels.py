"""What a classifier answers: a label with its class index and score (no heavy imports)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Label:
    """One of the top-k classes (results carry them: ``edgefleet.runtime.results``)."""

    label: str
    index: int
    score: float


def label_dicts(top: Sequence[Label]) -> list[dict[str, Any]]:
    """Labels as the wire carries them (results, samples): scores to five decimals."""
    return [{"label": t.label, "index": t.index, "score": round(t.score, 5)} for t in top]
