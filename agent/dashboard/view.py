"""The live fleet view: what every device reports, with the age of each figure.

Fed from the collector (each stored message, each status) or from a plain subscriber (``top``)
and read by the dashboard, ``/metrics``, alerts and ``edgefleet top``. Every read computes the
states at that moment from the collector's clock, so a device that went quiet turns *stale*
(nothing arrived for ``stale_factor`` times its metrics interval) without a message saying so,
and a figure is never shown without its age. Devices gone longer than ``forget_after_s`` are
dropped, so their series do not linger.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgefleet.dashboard.latency import FleetLatency, Totals
from edgefleet.dashboard.rows import (
    AGE_FIELDS,
    STALE,
    UNKNOWN,
    _age,
    _age_fields,
    _delegate_kind,
    _num,
    _rollout,
    summarize,
    worst_first,
)
from edgefleet.protocol import OFFLINE, ONLINE, STOPPED

DEFAULT_METRICS_INTERVAL_S = 10.0
SERIES_POINTS = 360  # per device: an hour at the default 10 s metrics interval
RECENT_PREDICTIONS = 20
HISTORY = 50

Clock = Callable[[], float]
# What the view reads of each device's topics (and the desired models, apart).
DEVICE_LEAVES = ("status", "metrics", "predictions", "rollout")


@dataclass
class _CachedRow:
    key: tuple[int, str, int]  # record version, state, group desired version
    row: dict[str, Any]
    json: str  # the row's JSON without its closing brace (the ages follow)


@dataclass
class DeviceRecord:
    """What is known of one device, each part with when it arrived (collector clock)."""

    device: str
    status: dict[str, Any] = field(default_factory=dict)
    status_at: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    metrics_at: float = 0.0
    rollout: dict[str, Any] = field(default_factory=dict)
    desired: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None  # label, score, ts
    prediction_at: float = 0.0
    predictions: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=RECENT_PREDICTIONS)
    )
    series: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=SERIES_POINTS))
    presence_history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    rollout_history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    version: int = 0  # bumped on every change, for live updates
    # Collector clock minus device clock, from the last live (not replayed) message: a device
    # without an RTC may be days off, or jump; its own times are read through this.
    clock_offset: float | None = None
    metrics_ts: float = 0.0  # the current metrics' device time, on the collector's clock

    def last_arrival(self) -> float:
        return max(self.status_at, self.metrics_at, self.prediction_at)

    def interval_s(self) -> float:
        return _num(self.metrics.get("interval_s")) or DEFAULT_METRICS_INTERVAL_S


class FleetView:
    """Thread-safe; writers are the MQTT threads, readers the HTTP, SSE and alert threads."""

    def __init__(
        self,
        stale_factor: float = 3.0,
        forget_after_s: float = 24 * 3600,
        clock: Clock = time.time,
    ) -> None:
        self.stale_factor = stale_factor
        self.forget_after_s = forget_after_s
        self.clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._devices: dict[str, DeviceRecord] = {}
        self._group_desired: dict[str, dict[str, Any]] = {}
        self._latency = FleetLatency()
        # Rows as last built, by device: (record version, state, groups version), row.
        self._rows: dict[str, _CachedRow] = {}
        self._groups_version = 0
        self.version = 0

    # -- writers ----------------------------------------------------------------------------
    def _record(self, device: str) -> DeviceRecord:
        record = self._devices.get(device)
        if record is None:
            record = self._devices[device] = DeviceRecord(device)
        return record

    def _bump(self, record: DeviceRecord | None) -> None:
        self.version += 1
        if record is not None:
            record.version = self.version
        self._changed.notify_all()

    def on_status(self, device: str, body: dict[str, Any]) -> None:
        now = self.clock()
        with self._lock:
            record = self._record(device)
            state = body.get("state")
            if state != record.status.get("state"):
                record.presence_history.append({"ts": now, "state": state})
            record.status, record.status_at = body, now
            self._bump(record)

    def _device_time(self, record: DeviceRecord, body: dict[str, Any], now: float) -> float:
        """A message's ``ts`` on the collector's clock; live messages update the offset."""
        ts = _num(body.get("ts"))
        if ts is None:
            return now
        if not body.get("replayed"):
            record.clock_offset = now - ts
        return ts + (record.clock_offset or 0.0)

    def on_metrics(self, device: str, body: dict[str, Any]) -> None:
        now = self.clock()
        with self._lock:
            record = self._record(device)
            ts = self._device_time(record, body, now)
            # A replayed (older) message fills the history but never replaces fresher figures.
            if ts >= record.metrics_ts:
                record.metrics, record.metrics_at, record.metrics_ts = body, now, ts
            model = record.status.get("model") or {}
            self._latency.add(
                device,
                body,
                (str(model.get("name") or ""), str(model.get("version") or "")),
                _delegate_kind(body.get("delegate") or record.status.get("delegate")),
            )
            total = (body.get("latency_ms") or {}).get("total") or {}
            record.series.append(
                {
                    "ts": ts,
                    "fps": _num(body.get("fps")),
                    "p50": _num(total.get("p50")),
                    "p99": _num(total.get("p99")),
                    "dropped": _num(body.get("dropped_frames")),
                }
            )
            self._bump(record)

    def on_predictions(self, device: str, body: dict[str, Any]) -> None:
        now = self.clock()
        results = body.get("results")
        if not isinstance(results, list) or not results:
            return
        with self._lock:
            record = self._record(device)
            self._device_time(record, body, now)  # the message's own ts: the offset
            offset = record.clock_offset or 0.0
            for result in results:
                top = (result.get("top") or [{}])[0] if isinstance(result, dict) else {}
                made = _num(result.get("ts")) if isinstance(result, dict) else None
                entry = {
                    "label": top.get("label"),
                    "score": _num(top.get("score")),
                    "ts": made + offset if made is not None else None,
                    "model": result.get("model"),
                    "model_version": result.get("model_version"),
                }
                record.predictions.append(entry)
                newest = record.prediction or {}
                if (entry["ts"] or 0.0) >= (newest.get("ts") or 0.0):
                    record.prediction = entry
            record.prediction_at = now
            self._bump(record)

    def on_rollout(self, device: str, body: dict[str, Any]) -> None:
        with self._lock:
            record = self._record(device)
            if (body.get("rollout_id"), body.get("state")) != (
                record.rollout.get("rollout_id"),
                record.rollout.get("state"),
            ):
                record.rollout_history.append(
                    {
                        key: body.get(key)
                        for key in ("ts", "state", "name", "version", "reason", "rollout_id")
                    }
                )
            record.rollout = body
            self._bump(record)

    def observe(self, leaf: str, device: str, body: dict[str, Any]) -> None:
        """A device's message, by the last level of its topic (one of ``DEVICE_LEAVES``)."""
        handlers = {
            "status": self.on_status,
            "metrics": self.on_metrics,
            "predictions": self.on_predictions,
            "rollout": self.on_rollout,
        }
        handler = handlers.get(leaf)
        if handler is not None:
            handler(device, body)

    def on_desired(self, target: str, body: dict[str, Any] | None) -> None:
        """``device:ID`` or ``group:NAME``; None when the desired state was cleared."""
        kind, _, name = target.partition(":")
        with self._lock:
            if kind == "group":
                if body is None:
                    self._group_desired.pop(name, None)
                else:
                    self._group_desired[name] = body
                self._groups_version += 1
                self._bump(None)
            else:
                record = self._record(name)
                record.desired = body
                self._bump(record)

    # -- readers ----------------------------------------------------------------------------
    def wait_change(self, after: int, timeout: float) -> int:
        """Block until the view's version passes ``after`` (or the timeout); the version."""
        with self._changed:
            self._changed.wait_for(lambda: self.version > after, timeout)
            return self.version

    def _forget_old(self, now: float) -> None:
        gone = [
            name
            for name, record in self._devices.items()
            if now - record.last_arrival() > self.forget_after_s
        ]
        for name in gone:
            del self._devices[name]
            self._rows.pop(name, None)
            self._latency.forget(name)

    def _state(self, record: DeviceRecord, now: float) -> str:
        presence = record.status.get("state")
        if presence in (OFFLINE, STOPPED):
            return str(presence)
        quiet = now - record.last_arrival()
        if quiet > self.stale_factor * record.interval_s():
            return STALE
        return ONLINE if presence == ONLINE else UNKNOWN

    def _desired(self, record: DeviceRecord) -> dict[str, Any] | None:
        if record.desired is not None:
            return record.desired
        groups = record.status.get("groups") or []
        return next((self._group_desired[g] for g in groups if g in self._group_desired), None)

    def _cached(self, record: DeviceRecord, now: float) -> _CachedRow:
        """A device's row without its ages: rebuilt only when the device or its state changed."""
        state = self._state(record, now)
        key = (record.version, state, self._groups_version)
        cached = self._rows.get(record.device)
        if cached is None or cached.key != key:
            row = self._fresh_row(record, state)
            cached = _CachedRow(key, row, json.dumps(row, separators=(",", ":"))[:-1])
            self._rows[record.device] = cached
        return cached

    @staticmethod
    def _ages(record: DeviceRecord, now: float) -> tuple[float | None, ...]:
        arrival = record.last_arrival()
        prediction = record.prediction
        return (
            round(now - arrival, 1) if arrival else None,
            round(now - record.metrics_at, 1) if record.metrics_at else None,
            _age(now, prediction.get("ts")) if prediction else None,
        )

    def _row(self, record: DeviceRecord, now: float) -> dict[str, Any]:
        row = dict(self._cached(record, now).row)
        row.update(zip(AGE_FIELDS, self._ages(record, now), strict=True))
        return row

    def _fresh_row(self, record: DeviceRecord, state: str) -> dict[str, Any]:
        status, metrics = record.status, record.metrics
        live = state == ONLINE  # figures of a device that is not up are not shown as current
        model = status.get("model") or {}
        want = self._desired(record) or {}
        health = metrics.get("health") or {}
        latency = (metrics.get("latency_ms") or {}).get("total") or {}
        throttled = health.get("throttled") or {}
        throttled_now, since_boot = throttled.get("now") or {}, throttled.get("since_boot") or {}
        state_dir = status.get("state_dir") or {}
        arrival = record.last_arrival()
        return {
            "device": record.device,
            "state": state,
            "presence": status.get("state", UNKNOWN),
            "groups": status.get("groups") or [],
            "agent_version": status.get("agent_version"),
            "last_seen": arrival or None,
            "metrics_ts": record.metrics_ts or None,
            "clock_offset_s": round(record.clock_offset, 1)
            if record.clock_offset is not None
            else None,
            "clock_synced": (status.get("clock") or {}).get("synced"),
            "metrics_interval_s": record.interval_s(),
            "model": {"name": model.get("name"), "version": model.get("version")}
            if model
            else None,
            "desired": {"name": want.get("name"), "version": want.get("version")} if want else None,
            "converged": not want
            or (model.get("name"), model.get("version")) == (want.get("name"), want.get("version")),
            "rollout": _rollout(record.rollout) if record.rollout else None,
            "delegate": _delegate_kind(metrics.get("delegate") or status.get("delegate")) or None,
            "fps": _num(metrics.get("fps")) if live else None,
            "inferences": _num(metrics.get("inferences")),
            "dropped_frames": _num(metrics.get("dropped_frames")),
            "latency_p50_ms": _num(latency.get("p50")) if live else None,
            "latency_p99_ms": _num(latency.get("p99")) if live else None,
            "latency_window": _num(metrics.get("latency_window")),
            "cpu_temp_c": _num(health.get("cpu_temp_c")) if live else None,
            "throttled": sorted(flag for flag, on in throttled_now.items() if on),
            "throttled_since_boot": sorted(flag for flag, on in since_boot.items() if on),
            "uptime_s": _num(health.get("uptime_s")) if live else None,
            "disk_free_bytes": _num(health.get("disk_free_bytes")) if live else None,
            "state_dir_full": bool(state_dir.get("full")) if live else None,
            "spool_backlog": _num((metrics.get("spool") or {}).get("depth")),
            "prediction": record.prediction,
            "version": record.version,
        }

    def _present(self) -> tuple[float, list[DeviceRecord]]:
        """Under the lock: the clock now and every device not forgotten by now."""
        now = self.clock()
        self._forget_old(now)
        return now, list(self._devices.values())

    def rows(self) -> list[dict[str, Any]]:
        """Every device, worst first (state rank, then longest silent)."""
        with self._lock:
            now, records = self._present()
            rows = [self._row(record, now) for record in records]
        rows.sort(key=worst_first)
        return rows

    def fleet(self) -> dict[str, Any]:
        rows = self.rows()
        return {"ts": self.clock(), "summary": summarize(rows), "devices": rows}

    def changes(
        self, known: dict[str, tuple[int, str, int]]
    ) -> tuple[list[dict[str, Any]], list[str], dict[str, Any], dict[str, tuple[int, str, int]]]:
        """Rows that changed since ``known`` (device -> row key), the devices gone, the summary,
        and the new keys: what a live page needs once a second, without copying every row."""
        with self._lock:
            now, records = self._present()
            keys: dict[str, tuple[int, str, int]] = {}
            changed, rows = [], []
            for record in records:
                cached = self._cached(record, now)
                keys[record.device] = cached.key
                rows.append(cached.row)
                if known.get(record.device) != cached.key:
                    changed.append(self._row(record, now))
        removed = sorted(set(known) - set(keys))
        return changed, removed, summarize(rows), keys

    def fleet_json(self) -> bytes:
        """``fleet()`` as JSON, fast: each row's JSON is kept until it changes; only the ages
        are written at each call (the dashboard API answers thousands of devices this way)."""
        with self._lock:
            now, records = self._present()
            parts = [(self._cached(record, now), self._ages(record, now)) for record in records]
        # The order and the summary read no age but the first: no row needs copying.
        parts.sort(key=lambda part: worst_first(part[0].row, part[1][0]))
        texts = [cached.json + _age_fields(ages) for cached, ages in parts]
        summary = json.dumps(summarize([cached.row for cached, _ in parts]), separators=(",", ":"))
        return f'{{"ts":{now},"summary":{summary},"devices":[{",".join(texts)}]}}'.encode()

    def device(self, device: str) -> dict[str, Any] | None:
        with self._lock:
            record = self._devices.get(device)
            if record is None:
                return None
            now = self.clock()
            return {
                "ts": now,
                "row": self._row(record, now),
                "status": record.status,
                "metrics": record.metrics,
                "series": list(record.series),
                "predictions": list(record.predictions)[::-1],
                "presence_history": list(record.presence_history)[::-1],
                "rollout_history": list(record.rollout_history)[::-1],
            }

    def fleet_latency(self) -> tuple[tuple[float, ...], dict[tuple[str, str, str, str], Totals]]:
        """The fleet's latency counters by (model, version, delegate, stage), and the bounds."""
        with self._lock:
            totals = {
                key: Totals(list(t.counts), t.sum_ms) for key, t in self._latency.totals.items()
            }
            return self._latency.bounds, totals

    def histograms(self) -> dict[str, dict[str, Any]]:
        """Each live device's latency histograms and bucket bounds (for ``/metrics``)."""
        with self._lock:
            now = self.clock()
            out = {}
            for name, record in self._devices.items():
                if self._state(record, now) != ONLINE:
                    continue
                hist = record.metrics.get("latency_hist")
                bounds = record.metrics.get("latency_buckets_ms")
                if isinstance(hist, dict) and isinstance(bounds, list):
                    out[name] = {"bounds": bounds, "stages": hist}
            return out
