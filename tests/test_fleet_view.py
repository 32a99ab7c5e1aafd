"""The fleet view (states by the clock, worst first, no stale figures), /metrics, alerts."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from edgefleet.dashboard.alerts import Alerter, LabelRule, webhook_poster
from edgefleet.dashboard.promexport import exposition
from edgefleet.dashboard.server import Dashboard, is_loopback, parse_bind
from edgefleet.dashboard.view import FleetView
from edgefleet.errors import UserError
from edgefleet.protocol import LATENCY_BUCKETS_MS
from edgefleet.runtime.stats import Histogram

from .conftest import REPO
from .mqtt_helpers import wait_for

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _status(state: str = "online", **extra: Any) -> dict[str, Any]:
    return {"state": state, "device": "d", "boot_id": "b", "ts": 0, "groups": ["lab"],
            "model": {"name": "m", "version": 1, "sha256": "x"}, "agent_version": "0.1.0",
            **extra}  # fmt: skip


def _metrics(ts: float, fps: float = 10.0, n: int = 5, **extra: Any) -> dict[str, Any]:
    counts = [0] * 3 + [n] * (len(LATENCY_BUCKETS_MS) - 2)  # n frames, all in (3, 5] ms
    return {
        "boot_id": "b", "ts": ts, "interval_s": 10, "fps": fps, "inferences": 100,
        "dropped_frames": 2,
        "latency_ms": {"total": {"p50": 4.0, "p99": 6.0}}, "latency_window": 100,
        "latency_buckets_ms": list(LATENCY_BUCKETS_MS),
        "latency_hist": {"total": {"counts": counts, "sum_ms": 4.0 * n}},
        "delegate": {"type": "cpu"}, "spool": {"depth": 3},
        "health": {"cpu_temp_c": 55.0, "throttled": {"now": {"throttled": False}}},
        **extra,
    }  # fmt: skip


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def view(clock: Clock) -> FleetView:
    return FleetView(clock=clock)


def _state(view: FleetView, device: str) -> str:
    return str(next(r["state"] for r in view.rows() if r["device"] == device))


def test_a_quiet_device_turns_stale_by_the_clock_alone(view: FleetView, clock: Clock) -> None:
    view.on_status("a", _status())
    view.on_metrics("a", _metrics(clock.now))
    assert _state(view, "a") == "online"
    clock.now += 29  # 3 x the 10 s interval the device announced, not yet
    assert _state(view, "a") == "online"
    clock.now += 2
    row = view.rows()[0]
    assert row["state"] == "stale"
    assert row["age_s"] == 31
    # no figure of a device that is not up is shown as current
    assert row["fps"] is None
    assert row["latency_p99_ms"] is None
    assert row["cpu_temp_c"] is None
    view.on_metrics("a", _metrics(clock.now))
    assert _state(view, "a") == "online"


def test_ages_are_right_for_a_device_whose_clock_is_off_or_jumps(
    view: FleetView, clock: Clock
) -> None:
    """A Pi without an RTC starts with a clock days off, then NTP jumps it: the ages the
    page shows come from the collector's clock, and the device's times are read through
    the offset its live messages show."""
    days = 400 * 86400
    device_now = clock.now - days
    view.on_status("a", _status(clock={"synced": False}))
    view.on_metrics("a", _metrics(device_now))
    prediction = {"ts": device_now, "results": [
        {"ts": device_now - 0.5, "top": [{"label": "cat", "score": 0.9}]}
    ]}  # fmt: skip
    view.on_predictions("a", prediction)
    row = view.rows()[0]
    assert row["clock_offset_s"] == pytest.approx(days, abs=2)
    assert row["clock_synced"] is False
    assert row["prediction_age_s"] == pytest.approx(0.5, abs=0.1)  # not 400 days
    assert row["state"] == "online"
    # A backlog replayed later keeps its own age (2 s old), read with the offset now known.
    clock.now += 2
    replayed = {"ts": device_now, "replayed": True, "results": [
        {"ts": device_now, "top": [{"label": "dog", "score": 0.8}]}
    ]}  # fmt: skip
    view.on_predictions("a", replayed)
    assert view.rows()[0]["prediction_age_s"] == pytest.approx(2.0, abs=0.1)
    # NTP sets the clock: the next live message moves the offset, ages stay right.
    view.on_metrics("a", _metrics(clock.now))
    row = view.rows()[0]
    assert row["clock_offset_s"] == pytest.approx(0.0, abs=0.1)
    assert row["metrics_ts"] == pytest.approx(clock.now)
    assert row["age_s"] == 0


def test_offline_and_stopped_come_from_the_device_and_rank_worst_first(
    view: FleetView, clock: Clock
) -> None:
    for name, state in (("ok", "online"), ("gone", "offline"), ("off", "stopped")):
        view.on_status(name, _status(state))
        view.on_metrics(name, _metrics(clock.now))
    view.on_status("quiet", _status())
    clock.now += 5
    view.on_status("hot", _status())
    view.on_metrics("hot", _metrics(clock.now, health={"throttled": {"now": {"throttled": True}}}))
    view.on_status("ok", _status())
    clock.now += 40  # "quiet" heard nothing for 45 s (default interval 10 s): stale
    view.on_metrics("ok", _metrics(clock.now))
    view.on_metrics("hot", _metrics(clock.now, health={"throttled": {"now": {"throttled": True}}}))
    order = [(r["device"], r["state"]) for r in view.rows()]
    assert order == [
        ("gone", "offline"),
        ("quiet", "stale"),
        ("off", "stopped"),
        ("hot", "online"),  # in trouble (throttled): before the healthy one
        ("ok", "online"),
    ]
    summary = view.fleet()["summary"]
    assert summary["by_state"] == {"offline": 1, "stale": 1, "stopped": 1, "online": 2}
    assert summary["throttled"] == 1
    assert summary["fps_total"] == 20.0  # only devices that are up count


def test_a_replayed_older_message_never_replaces_fresher_figures(
    view: FleetView, clock: Clock
) -> None:
    view.on_status("a", _status())
    view.on_metrics("a", _metrics(clock.now, fps=12.0))
    view.on_metrics("a", _metrics(clock.now - 300, fps=1.0, replayed=True))  # from the spool
    row = view.rows()[0]
    assert row["fps"] == 12.0
    assert len(view.device("a")["series"]) == 2  # type: ignore[index]


def test_desired_from_the_group_and_convergence(view: FleetView) -> None:
    view.on_status("a", _status())
    view.on_desired("group:lab", {"name": "m", "version": 2})
    row = view.rows()[0]
    assert row["desired"] == {"name": "m", "version": 2}
    assert not row["converged"]
    view.on_desired("device:a", {"name": "m", "version": 1})  # the device's own wins
    assert view.rows()[0]["converged"]
    view.on_desired("device:a", None)
    view.on_desired("group:lab", None)
    assert view.rows()[0]["desired"] is None


def test_devices_gone_for_a_day_are_forgotten(view: FleetView, clock: Clock) -> None:
    view.on_status("a", _status("offline"))
    clock.now += 24 * 3600 + 1
    assert view.rows() == []
    assert "edgefleet_device_up" not in exposition(view, dict).decode().split("# TYPE")[-1]
    assert 'device="a"' not in exposition(view, dict).decode()


def test_metrics_export_only_what_is_true_now(view: FleetView, clock: Clock) -> None:
    view.on_status("up", _status())
    view.on_metrics("up", _metrics(clock.now))
    view.on_status("down", _status("offline"))
    view.on_metrics("down", _metrics(clock.now))
    text = exposition(view, lambda: {"stored": 7}, device_histograms=True).decode()
    assert 'edgefleet_device_up{device="up"} 1.0' in text
    assert 'edgefleet_device_up{device="down"} 0.0' in text
    assert 'edgefleet_fps{device="up"} 10.0' in text
    assert 'edgefleet_latency_p99_seconds{device="up"} 0.006' in text
    assert 'edgefleet_fps{device="down"}' not in text
    assert 'edgefleet_device_latency_seconds_bucket{device="down"' not in text
    assert (
        'edgefleet_device_latency_seconds_bucket{device="up",le="0.005",stage="total"} 5.0' in text
    )
    assert 'edgefleet_device_latency_seconds_sum{device="up",stage="total"} 0.02' in text
    assert "edgefleet_collector_stored_total 7.0" in text
    assert "edgefleet_device_latency_seconds" not in exposition(view, dict).decode()
    if Path(PROMTOOL).exists():
        checked = subprocess.run(
            [PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize(
    "hist",
    [
        {"total": {"counts": [1, 2], "sum_ms": 1.0}},  # wrong length
        {"total": {"counts": [5, 4, *[4] * (len(LATENCY_BUCKETS_MS) - 1)], "sum_ms": 1.0}},
        {"total": {"counts": ["x"] * (len(LATENCY_BUCKETS_MS) + 1), "sum_ms": 1.0}},
        {"total": "nonsense"},
    ],
)
def test_a_device_sending_a_broken_histogram_costs_only_its_histogram(
    view: FleetView, clock: Clock, hist: dict[str, Any]
) -> None:
    view.on_status("bad", _status())
    view.on_metrics("bad", _metrics(clock.now, latency_hist=hist))
    view.on_status("good", _status())
    view.on_metrics("good", _metrics(clock.now))
    text = exposition(view, dict, device_histograms=True).decode()
    assert 'edgefleet_device_latency_seconds_bucket{device="bad"' not in text
    assert 'edgefleet_device_latency_seconds_count{device="good",stage="total"} 5.0' in text
    assert 'edgefleet_device_up{device="bad"} 1.0' in text


def _fleet_count(view: FleetView) -> dict[tuple[str, ...], int]:
    _, totals = view.fleet_latency()
    return {key: t.counts[-1] for key, t in totals.items()}


def test_the_fleet_histogram_is_a_true_counter_across_restarts_and_replays(
    view: FleetView, clock: Clock
) -> None:
    key = ("m", "1", "cpu", "total")
    for name in ("a", "b"):
        view.on_status(name, _status())
        view.on_metrics(name, _metrics(clock.now, n=100))  # first sight: a baseline only
    assert _fleet_count(view) == {}
    clock.now += 10
    view.on_metrics("a", _metrics(clock.now, n=130))
    view.on_metrics("b", _metrics(clock.now, n=110))
    assert _fleet_count(view) == {key: 40}
    view.on_metrics("a", _metrics(clock.now - 5, n=120))  # a replay: already counted
    assert _fleet_count(view) == {key: 40}
    clock.now += 10
    restarted = _metrics(clock.now, n=7)
    restarted["boot_id"] = "b2"  # "a" restarted: its 7 frames since are new, not -123
    view.on_metrics("a", restarted)
    late = _metrics(clock.now - 15, n=500)  # "b": a message from a boot before the last one
    late["boot_id"] = "old"
    view.on_metrics("b", late)
    assert _fleet_count(view) == {key: 47}
    _, totals = view.fleet_latency()
    assert totals[key].sum_ms == pytest.approx(4.0 * 47)
    view.on_status("a", _status(model={"name": "m", "version": 2, "sha256": "y"}))
    clock.now += 10
    restarted["ts"], restarted["latency_hist"] = clock.now, _metrics(0, n=10)["latency_hist"]
    view.on_metrics("a", restarted)
    assert _fleet_count(view) == {key: 47, ("m", "2", "cpu", "total"): 3}


def test_the_agent_histogram_is_cumulative_with_the_fixed_bounds() -> None:
    hist = Histogram()
    for value in (0.5, 1.0, 1.01, 2500.0):
        hist.add(value)
    out = hist.cumulative()
    assert out["counts"][0] == 2  # <= 1 ms (the bound itself included)
    assert out["counts"][1] == 3  # <= 2 ms
    assert out["counts"][-2] == 3  # <= 2000 ms
    assert out["counts"][-1] == 4  # +Inf
    assert out["sum_ms"] == 2502.51


def test_binding_beyond_loopback_needs_a_token(view: FleetView) -> None:
    assert all(is_loopback(host) for host in ("127.0.0.1", "::1", "localhost"))
    assert not is_loopback("0.0.0.0")
    assert parse_bind("[::1]:8080") == ("::1", 8080)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_bind("8080")
    with pytest.raises(UserError, match="needs --http-token-file"):
        Dashboard(view, "0.0.0.0:0")


# -- alerts --------------------------------------------------------------------------------
class Receiver:
    """A local webhook receiver: every POSTed JSON body."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                outer.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kinds(self) -> list[tuple[str, str]]:
        return [(b["alert"], b["device"]) for b in self.bodies]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def test_alerts_reach_the_webhook_on_changes_only_and_rate_limited(
    view: FleetView, clock: Clock, receiver: Receiver
) -> None:
    for name in ("a", "b"):
        view.on_status(name, _status())
        view.on_metrics(name, _metrics(clock.now))
    view.on_status("was-offline", _status("offline"))
    alerter = Alerter(
        view, webhook_poster(receiver.url), [LabelRule.parse("person:0.6")], min_interval_s=300
    )
    alerter.check()  # the baseline: an offline device at start is not news
    view.on_status("a", _status("offline"))
    view.on_rollout("b", {"state": "failed", "name": "m", "version": 2, "reason": "preflight"})
    view.on_metrics("b", _metrics(clock.now, health={"throttled": {"now": {"throttled": True}}}))
    alerter.check()
    alerter.on_stored(
        "predictions",
        "b",
        {"results": [{"top": [{"label": "person", "score": 0.7}], "ts": 1},
                     {"top": [{"label": "person", "score": 0.5}], "ts": 2},
                     {"top": [{"label": "cat", "score": 0.99}], "ts": 3}]},
    )  # fmt: skip
    # flapping: back and offline again within the interval -> one alert of each kind
    view.on_status("a", _status())
    alerter.check()
    view.on_status("a", _status("offline"))
    alerter.check()
    alerter.start()
    expected = [
        ("device_offline", "a"),
        ("rollout_failed", "b"),
        ("throttled", "b"),
        ("label_seen", "b"),
        ("device_back", "a"),
    ]
    wait_for(lambda: len(receiver.bodies) >= len(expected), 10, "alerts posted")
    alerter.stop()
    assert receiver.kinds() == expected
    assert alerter.suppressed == 1  # the second device_offline of "a"
    first = receiver.bodies[0]
    assert first["text"] == "a is offline (was online)"
    assert receiver.bodies[3]["details"]["score"] == 0.7


def test_a_dead_webhook_costs_log_lines_only(view: FleetView) -> None:
    alerter = Alerter(view, webhook_poster("http://127.0.0.1:9/nothing"), min_interval_s=0)
    alerter.start()
    for index in range(3):
        assert alerter.raise_alert("device_offline", f"d{index}", "x", {})
    wait_for(lambda: alerter.failed == 3, 20, "three failed posts")
    alerter.stop()


def test_at_most_max_per_minute_alerts_whatever_the_fleet_does(view: FleetView) -> None:
    sent: list[dict[str, Any]] = []
    alerter = Alerter(view, sent.append, min_interval_s=0, max_per_minute=5)
    queued = [alerter.raise_alert("device_offline", f"d{i}", "x", {}) for i in range(20)]
    assert queued.count(True) == 5
    assert alerter.suppressed == 15


@pytest.mark.parametrize(
    ("text", "rule"),
    [("person", LabelRule("person", 0.5)), ("person:0.8", LabelRule("person", 0.8)),
     ("a:b:0.1", LabelRule("a:b", 0.1))],
)  # fmt: skip
def test_label_rules_parse(text: str, rule: LabelRule) -> None:
    assert LabelRule.parse(text) == rule


def test_shipped_alert_rules_pass_promtool_tests() -> None:
    if not Path(PROMTOOL).exists():
        pytest.skip("promtool not installed (./dev test installs Debian's prometheus)")
    rules = REPO / "configs" / "prometheus"
    for args in (["check", "rules", "edgefleet-alerts.yml"],
                 ["test", "rules", "edgefleet-alerts.test.yml"]):  # fmt: skip
        done = subprocess.run(
            [PROMTOOL, *args], cwd=rules, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_fast_json_is_the_fleet(view: FleetView, clock: Clock) -> None:
    view.on_status("a", _status())
    view.on_metrics("a", _metrics(clock.now))
    view.on_predictions("a", {"results": [{"top": [{"label": "cat", "score": 0.5}], "ts": 1.0}]})
    view.on_status("b", _status("offline"))
    view.on_desired("group:lab", {"name": "m", "version": 3})
    for _ in range(2):  # built, then from the cache
        clock.now += 1.5
        assert json.loads(view.fleet_json()) == view.fleet()
    clock.now += 100  # "a" is stale now: its row is rebuilt, not only aged
    fast = json.loads(view.fleet_json())
    assert fast == view.fleet()
    assert [r["state"] for r in fast["devices"]] == ["offline", "stale"]
    assert fast["devices"][1]["age_s"] == 103.0


def test_shadow_phases_show_per_device_and_per_release(view: FleetView) -> None:
    for name, agreement in (("a", 0.99), ("b", 0.95), ("c", 0.97)):
        view.on_status(name, _status())
        view.on_rollout(
            name,
            {"state": "shadow", "name": "m", "version": 2, "awaiting_decision": name == "c",
             "shadow": {"samples": 40, "target": 300, "agreement": agreement}},
        )  # fmt: skip
    rows = {r["device"]: r for r in view.rows()}
    assert rows["a"]["rollout"]["shadow"] == {
        "samples": 40, "target": 300, "agreement": 0.99, "latency_ratio": None
    }  # fmt: skip
    assert rows["c"]["rollout"]["awaiting_decision"] is True
    summary = view.fleet()["summary"]
    assert summary["shadow"] == {"m v2": {"devices": 3, "min": 0.95, "median": 0.97, "max": 0.99}}
    assert summary["rollouts"] == {"shadow": 3}
    text = exposition(view, dict).decode()
    assert 'edgefleet_rollout_state{device="a",state="shadow"} 1.0' in text
    view.on_rollout("b", {"state": "rejected", "name": "m", "version": 2})
    assert view.fleet()["summary"]["rollouts"] == {"shadow": 2}  # decided is not in progress
    view.on_rollout("a", {"state": "made-up", "name": "m", "version": 2})
    assert 'device="a",state="made-up"' not in exposition(view, dict).decode()
