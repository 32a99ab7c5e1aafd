"""Health sensors on fake sysfs trees; report policies; command parsing (property-based)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.errors import UserError
from edgefleet.mqtt.commands import CommandHandler
from edgefleet.mqtt.reporter import ReportState
from edgefleet.mqtt.settings import ReportPolicy
from edgefleet.runtime import health
from edgefleet.runtime.pipeline import LoopSettings
from edgefleet.runtime.results import Label, Result


def test_cpu_and_coral_temperature_from_sysfs(tmp_path: Path) -> None:
    zone = tmp_path / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("51234\n")
    apex = tmp_path / "class" / "apex" / "apex_0"
    apex.mkdir(parents=True)
    (apex / "temp").write_text("44500\n")
    assert health.cpu_temperature_c(tmp_path) == 51.2
    assert health.coral_temperatures_c(tmp_path) == {"apex_0": 44.5}


def test_absent_sensors_are_omitted(tmp_path: Path) -> None:
    data = health.collect(None, sys_root=tmp_path, proc_root=tmp_path)
    assert "cpu_temp_c" not in data
    assert "coral_temp_c" not in data
    assert "memory" not in data


def test_throttled_bits() -> None:
    flags = health.parse_throttled("throttled=0x50005\n")
    assert flags is not None
    assert flags["now"]["under_voltage"] is True
    assert flags["now"]["throttled"] is True
    assert flags["now"]["arm_frequency_capped"] is False
    assert flags["since_boot"]["under_voltage"] is True
    assert flags["since_boot"]["throttled"] is True
    assert health.parse_throttled("garbage") is None


def _result(label: str, score: float, seq: int = 1) -> Result:
    return Result(
        seq=seq,
        boot_id="b",
        ts=0.0,
        model="m",
        model_version=0,
        top=[Label(label, 1, score)],
        timings_ms={},
        frame=seq,
    )


def test_policy_change_interval_min_score_batch() -> None:
    change = ReportState(ReportPolicy(mode="change"))
    sent = [change.wanted(_result(lbl, 0.9), float(i)) for i, lbl in enumerate("aabba")]
    assert sent == [True, False, True, False, True]

    interval = ReportState(ReportPolicy(mode="interval", interval_ms=1000))
    times = [0.0, 0.5, 1.0, 1.2, 2.5]
    assert [interval.wanted(_result("a", 0.9), t) for t in times] == [
        True,
        False,
        True,
        False,
        True,
    ]

    gate = ReportState(ReportPolicy(min_score=0.5))
    assert not gate.wanted(_result("a", 0.4), 0.0)
    assert gate.wanted(_result("a", 0.6), 0.0)

    batch = ReportState(ReportPolicy(batch_max=3, batch_ms=10_000))
    assert batch.add(_result("a", 0.9, 1), 0.0) is None
    assert batch.add(_result("a", 0.9, 2), 0.1) is None
    done = batch.add(_result("a", 0.9, 3), 0.2)
    assert done is not None
    assert [r["seq"] for r in done] == [1, 2, 3]
    assert batch.add(_result("a", 0.9, 4), 1.0) is None
    assert batch.take_if_due(11.0) is not None  # batch_ms elapsed


class _FakeStats:
    inferences = 3

    def fps(self) -> float:
        return 1.0


class _FakeAgent:
    """The AgentControl port: a loop, and a reload that cannot find a config file."""

    def __init__(self) -> None:
        self.pipeline = SimpleNamespace(
            settings=LoopSettings(), stats=_FakeStats(), last_frame=None, last_result=None
        )

    def reload_settings(self) -> dict[str, Any]:
        raise UserError("the agent was not started from a config file")


def _handler() -> CommandHandler:
    return CommandHandler(_FakeAgent(), ReportState(ReportPolicy()), max_bytes=4096)


def test_set_changes_settings_and_report() -> None:
    handler = _handler()
    reply = handler.execute(
        "set", json.dumps({"top_k": 3, "fps_cap": 0, "report": {"mode": "change"}}).encode()
    )
    assert reply["ok"] is True
    assert reply["result"]["top_k"] == 3
    assert reply["result"]["fps_cap"] is None
    assert reply["result"]["report"]["mode"] == "change"
    bad = handler.execute("set", b'{"report": {"mode": "sometimes"}}')
    assert bad["ok"] is False
    assert bad["error"].startswith("report.mode: Input should be")
    empty = handler.execute("set", b"{}")
    assert empty == {
        "command": "set",
        "ok": False,
        "error": "nothing to set (fps_cap, top_k, threshold, report)",
    }
    snap = handler.execute("snapshot", b"")
    assert snap["error"] == "no frame has been classified yet"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(["ping", "pause", "resume", "set", "reload", "snapshot", "nope", ""]),
    payload=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())),
)
def test_any_command_payload_gets_a_reply_never_an_exception(name: str, payload: bytes) -> None:
    reply: dict[str, Any] = _handler().execute(name, payload)
    assert reply["command"] == name
    assert isinstance(reply["ok"], bool)
    assert reply["ok"] or (isinstance(reply["error"], str) and reply["error"])


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b'{"fps_cap": 1e-10}', "fps_cap: Value error, must be 0 (no cap) or at least 0.001"),
        (b'{"fps_cap": 5000}', "fps_cap: Input should be less than or equal to 1000"),
        (b'{"top_k": 0}', "top_k: Input should be greater than or equal to 1"),
        (b'{"threshold": 1.5}', "threshold: Input should be less than or equal to 1"),
        (b'{"fps_cap": NaN}', "payload is not JSON: NaN is not a JSON number"),
        (b"[" * 4_000, "payload is not JSON: JSON nested deeper than 32 levels"),
    ],
)
def test_set_refuses_what_the_config_refuses(payload: bytes, error: str) -> None:
    handler = _handler()
    reply = handler.execute("set", payload)
    assert reply["ok"] is False
    assert reply["error"] == error
    assert handler.agent.pipeline is not None
    assert handler.agent.pipeline.settings.fps_cap is None  # nothing applied
