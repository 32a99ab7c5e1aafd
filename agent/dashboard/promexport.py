"""``/metrics``: the fleet view in Prometheus form, computed at scrape time.

Nothing is kept between scrapes: each one reads the view, so a device forgotten by the view
has no series, and an offline or stale device keeps only ``up``, ``last_seen``, ``state`` and
``info`` (its last fps or temperature would be a figure that is no longer true).

Latency: ``edgefleet_latency_seconds{model,model_version,delegate,stage}`` is a histogram of
the whole fleet built from the devices' bucket counts (``edgefleet.dashboard.latency``), so
``histogram_quantile(0.99, sum by (le) (rate(edgefleet_latency_seconds_bucket[5m])))`` is a
fleet-wide p99 whatever the fleet's size. Per-device histograms (``device_histograms``) cost
20 series per device and stage: fine for tens of devices, too many for thousands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, get_args

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from edgefleet.dashboard.latency import valid_counts
from edgefleet.dashboard.view import FleetView
from edgefleet.protocol import ONLINE, RolloutState

# Every state the protocol names (a device's own text is never a label value).
ROLLOUT_STATES = frozenset(get_args(RolloutState))
# (name, help, row field) of per-device gauges exported only while the device is up.
LIVE_GAUGES = (
    ("edgefleet_fps", "Frames classified per second", "fps"),
    ("edgefleet_cpu_temperature_celsius", "CPU temperature", "cpu_temp_c"),
    ("edgefleet_spool_backlog_messages", "Messages waiting in the device's spool", "spool_backlog"),
    ("edgefleet_uptime_seconds", "Seconds since the device booted", "uptime_s"),
    (
        "edgefleet_state_dir_free_bytes",
        "Free bytes where the agent keeps its state",
        "disk_free_bytes",
    ),
)
LIVE_SECONDS = (
    ("edgefleet_latency_p99_seconds", "Whole-frame latency p99 over the device's window",
     "latency_p99_ms"),
)  # fmt: skip


class FleetMetrics(Collector):
    """A prometheus-client collector over the fleet view."""

    def __init__(
        self,
        view: FleetView,
        counters: Callable[[], dict[str, int]],
        device_histograms: bool = False,
    ) -> None:
        self.view = view
        self.counters = counters  # the collector's own stored/rejected totals
        self.device_histograms = device_histograms

    def collect(self) -> Iterator[Metric]:
        rows = self.view.rows()
        up = GaugeMetricFamily(
            "edgefleet_device_up", "1 when online with fresh data, else 0", labels=["device"]
        )
        seen = GaugeMetricFamily(
            "edgefleet_device_last_seen_timestamp_seconds",
            "When the collector last heard from the device (Unix time)",
            labels=["device"],
        )
        info = GaugeMetricFamily(
            "edgefleet_device_info",
            "What the device runs",
            labels=["device", "model", "model_version", "delegate", "agent_version"],
        )
        state = GaugeMetricFamily(
            "edgefleet_device_state", "1 for the device's state", labels=["device", "state"]
        )
        throttled = GaugeMetricFamily(
            "edgefleet_throttled", "1 while the device reports throttling now", labels=["device"]
        )
        rollout = GaugeMetricFamily(
            "edgefleet_rollout_state",
            "1 for the state of the device's latest rollout",
            labels=["device", "state"],
        )
        inferences = CounterMetricFamily(
            "edgefleet_inferences", "Frames classified since the agent started", labels=["device"]
        )
        dropped = CounterMetricFamily(
            "edgefleet_dropped_frames",
            "Frames dropped since the agent started (the loop was busy)",
            labels=["device"],
        )
        live = {
            name: GaugeMetricFamily(name, text, labels=["device"])
            for name, text, _ in (*LIVE_GAUGES, *LIVE_SECONDS)
        }
        for row in rows:
            device = row["device"]
            is_up = row["state"] == ONLINE
            up.add_metric([device], 1.0 if is_up else 0.0)
            if row["last_seen"]:
                seen.add_metric([device], row["last_seen"])
            info.add_metric([device, *_info_labels(row)], 1.0)
            state.add_metric([device, row["state"]], 1.0)
            if row["rollout"] and row["rollout"].get("state") in ROLLOUT_STATES:
                rollout.add_metric([device, row["rollout"]["state"]], 1.0)
            if not is_up:
                continue
            throttled.add_metric([device], 1.0 if row["throttled"] else 0.0)
            if row["inferences"] is not None:
                inferences.add_metric([device], row["inferences"])
            if row["dropped_frames"] is not None:
                dropped.add_metric([device], row["dropped_frames"])
            for name, _, key in LIVE_GAUGES:
                if row[key] is not None:
                    live[name].add_metric([device], float(row[key]))
            for name, _, key in LIVE_SECONDS:
                if row[key] is not None:
                    live[name].add_metric([device], float(row[key]) / 1000)
        yield from (up, seen, info, state, rollout, throttled, inferences, dropped)
        yield from live.values()
        yield self._fleet_latency()
        if self.device_histograms:
            yield self._device_latency()
        for name, value in self.counters().items():
            yield CounterMetricFamily(f"edgefleet_collector_{name}", f"Collector: {name}", value)

    def _fleet_latency(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "edgefleet_latency_seconds",
            "Per-stage latency across the fleet (fixed buckets, see docs/protocol.md)",
            labels=["model", "model_version", "delegate", "stage"],
        )
        bounds, totals = self.view.fleet_latency()
        les = _les(bounds)
        for key, total in sorted(totals.items()):
            family.add_metric(
                list(key),
                [(le, float(count)) for le, count in zip(les, total.counts, strict=True)],
                sum_value=total.sum_ms / 1000,
            )
        return family

    def _device_latency(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "edgefleet_device_latency_seconds",
            "Per-stage latency of one device since its agent started",
            labels=["device", "stage"],
        )
        for device, hist in self.view.histograms().items():
            bounds = hist["bounds"]
            if not all(isinstance(b, (int, float)) for b in bounds):
                continue
            for stage, body in hist["stages"].items():
                parsed = valid_counts(body, len(bounds))
                if parsed is not None:
                    counts, total = parsed
                    buckets = [(le, float(c)) for le, c in zip(_les(bounds), counts, strict=True)]
                    family.add_metric([device, str(stage)], buckets, sum_value=total / 1000)
        return family


def _les(bounds: Sequence[float]) -> list[str]:
    """Bucket bounds as Prometheus ``le`` labels, in seconds."""
    return [f"{b / 1000:g}" for b in bounds] + ["+Inf"]


def _info_labels(row: dict[str, Any]) -> list[str]:
    model = row["model"] or {}
    return [
        str(model.get("name") or ""),
        str(model.get("version") or ""),
        str(row["delegate"] or ""),
        str(row["agent_version"] or ""),
    ]


def exposition(
    view: FleetView, counters: Callable[[], dict[str, int]], device_histograms: bool = False
) -> bytes:
    """The text a scrape gets (a registry per call: the view is the only state)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetMetrics(view, counters, device_histograms))
    return generate_latest(registry)
