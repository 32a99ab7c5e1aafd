"""Classification results as they leave the loop, and the filters that may change them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgefleet.inference.labels import Label, label_dicts

__all__ = ["Label", "Result", "ResultFilter"]


@dataclass(slots=True)
class Result:
    """One classified frame. ``boot_id`` + ``seq`` identify it uniquely across the fleet."""

    seq: int
    boot_id: str
    ts: float  # wall clock, seconds since the epoch
    model: str
    model_version: int
    top: list[Label]
    timings_ms: dict[str, float]
    frame: int
    origin: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seq": self.seq,
            "boot_id": self.boot_id,
            "ts": round(self.ts, 6),
            "model": self.model,
            "model_version": self.model_version,
            "top": label_dicts(self.top),
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "frame": self.frame,
        }
        if self.origin:
            out["origin"] = self.origin
        if self.extra:
            out["extra"] = self.extra
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)


class ResultFilter(Protocol):
    """Returned by ``edgefleet_result_filters``; called per result, in plugin order.

    Return the result (changed or not) to pass it on, or None to veto it: a vetoed result
    reaches no sink.
    """

    def __call__(self, result: Result) -> Result | None: ...
