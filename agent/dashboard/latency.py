"""Fleet-wide latency histograms: the devices' bucket counts summed into true counters.

Each device reports cumulative bucket counts since its agent started. Summing those raw
values across devices would not be a counter: one device restarting would make the sum
drop, and ``rate()`` would read that as the whole fleet resetting. So the collector adds
each device's *increase* since its previous message (after a restart, the new counts are
the increase, as Prometheus itself treats a reset), giving monotonic counters per
(model, version, delegate, stage) that stay few however many devices there are. An increase is
credited to the model and delegate the device reports in the message that carries it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgefleet.protocol import LATENCY_BUCKETS_MS

Key = tuple[str, str, str, str]  # model, model version, delegate, stage


def valid_counts(body: Any, buckets: int) -> tuple[list[int], float] | None:
    """A stage's ``(counts, sum_ms)`` when well formed: ``buckets + 1`` rising integers."""
    if not isinstance(body, dict):
        return None
    counts, total = body.get("counts"), body.get("sum_ms")
    if (
        not isinstance(counts, list)
        or len(counts) != buckets + 1
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
        or counts != sorted(counts)  # cumulative counts never decrease
        or isinstance(total, bool)
        or not isinstance(total, (int, float))
        or total < 0
    ):
        return None
    return counts, float(total)


@dataclass
class _Seen:
    boot_id: str
    ts: float
    stages: dict[str, tuple[list[int], float]] = field(default_factory=dict)


@dataclass
class Totals:
    counts: list[int]
    sum_ms: float = 0.0


class FleetLatency:
    """Not thread-safe: the fleet view calls it under its own lock."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_MS) -> None:
        self.bounds = bounds
        self.totals: dict[Key, Totals] = {}
        self._seen: dict[str, _Seen] = {}
        self.rejected = 0  # messages whose histogram was malformed or on other bounds

    def add(self, device: str, body: dict[str, Any], model: tuple[str, str], delegate: str) -> None:
        hist, bounds = body.get("latency_hist"), body.get("latency_buckets_ms")
        boot_id, ts = body.get("boot_id"), body.get("ts")
        if hist is None:
            return
        if (
            not isinstance(hist, dict)
            or not isinstance(boot_id, str)
            or not isinstance(ts, (int, float))
            or not isinstance(bounds, list)
            or tuple(bounds) != self.bounds
        ):
            self.rejected += 1
            return
        seen = self._seen.get(device)
        if seen is not None and seen.boot_id == boot_id and ts <= seen.ts:
            return  # a replay of something already counted
        if seen is not None and seen.boot_id != boot_id and ts <= seen.ts:
            return  # a late message from an earlier boot: its counts are not ours to add
        restarted = seen is None or seen.boot_id != boot_id
        current = _Seen(boot_id, float(ts))
        for stage, stage_body in hist.items():
            parsed = valid_counts(stage_body, len(self.bounds))
            if parsed is None:
                self.rejected += 1
                continue
            counts, total = parsed
            before = None if restarted or seen is None else seen.stages.get(stage)
            # First sight of a device: only what happens from now on counts (its history
            # since boot would arrive as one burst and distort the rate).
            if seen is not None:
                self._credit((*model, delegate, str(stage)), counts, total, before)
            current.stages[str(stage)] = (counts, total)
        self._seen[device] = current

    def _credit(
        self,
        key: Key,
        counts: list[int],
        total: float,
        before: tuple[list[int], float] | None,
    ) -> None:
        if before is not None and all(a >= b for a, b in zip(counts, before[0], strict=True)):
            delta = [a - b for a, b in zip(counts, before[0], strict=True)]
            delta_sum = max(0.0, total - before[1])
        else:  # a restart (or counts that went down): everything since is new
            delta, delta_sum = counts, total
        totals = self.totals.get(key)
        if totals is None:
            totals = self.totals[key] = Totals([0] * len(counts))
        totals.counts = [a + b for a, b in zip(totals.counts, delta, strict=True)]
        totals.sum_ms += delta_sum

    def forget(self, device: str) -> None:
        self._seen.pop(device, None)
