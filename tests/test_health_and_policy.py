"""Health sensors on fake sysfs trees; report policies; command parsing (property-based)."""

from __future__ import annotations

from pathlib import Path

from edgefleet.mqtt.reporter import ReportState
from edgefleet.mqtt.settings import ReportPolicy
from edgefleet.runtime import health
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
    assert [r.seq for r in done] == [1, 2, 3]
    assert batch.add(_result("a", 0.9, 4), 1.0) is None
    assert batch.take_if_due(11.0) is not None  # batch_ms elapsed


def test_default_policy_sends_what_came_since_the_outbox_last_ran() -> None:
    """batch_ms 0: nothing leaves from the loop's thread; each outbox turn takes all the
    results made since the last one as one message, never more than batch_max."""
    state = ReportState(ReportPolicy())
    assert state.take_if_due(0.0) is None  # nothing made: nothing sent
    assert state.add(_result("a", 0.9, 1), 0.0) is None
    assert state.add(_result("a", 0.9, 2), 0.001) is None
    turn = state.take_if_due(0.002)
    assert turn is not None
    assert [r.seq for r in turn] == [1, 2]
    assert state.take_if_due(0.003) is None
    full = [state.add(_result("a", 0.9, i), 0.0) for i in range(ReportPolicy().batch_max)]
    assert full[:-1] == [None] * (len(full) - 1)
    assert full[-1] is not None
    assert len(full[-1]) == ReportPolicy().batch_max
