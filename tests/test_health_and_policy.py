"""Health sensors on fake sysfs trees; report policies; command parsing (property-based)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.mqtt.reporter import ReportState
from edgefleet.mqtt.settings import ReportPolicy
from edgefleet.runtime import health
from edgefleet.runtime.results import Label, Result
from edgefleet.runtime.stats import FPS_WINDOW_S, LoopStats


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
    assert "uptime_s" not in data
    assert "disk_free_bytes" not in data


def test_throttled_bits() -> None:
    flags = health.parse_throttled("throttled=0x50005\n")
    assert flags is not None
    assert flags["now"]["under_voltage"] is True
    assert flags["now"]["throttled"] is True
    assert flags["now"]["arm_frequency_capped"] is False
    assert flags["since_boot"]["under_voltage"] is True
    assert flags["since_boot"]["throttled"] is True
    assert health.parse_throttled("garbage") is None


def test_a_pi_kernel_s_throttled_file_and_uptime(tmp_path: Path) -> None:
    """Raspberry Pi OS kernels expose the firmware's flags as a file: read, no subprocess."""
    firmware = tmp_path / "devices" / "platform" / "soc" / "soc:firmware"
    firmware.mkdir(parents=True)
    (firmware / "get_throttled").write_text("50005\n")  # under-voltage + throttled, now and since
    (tmp_path / "uptime").write_text("12345.67 23456.78\n")
    data = health.collect(tmp_path, sys_root=tmp_path, proc_root=tmp_path)
    assert data["throttled"]["now"]["under_voltage"] is True
    assert data["throttled"]["since_boot"]["throttled"] is True
    assert data["throttled"]["now"]["soft_temperature_limit"] is False
    assert data["uptime_s"] == 12345.7
    assert data["disk_free_bytes"] > 0
    assert data["disk_total_bytes"] >= data["disk_free_bytes"]
    (firmware / "get_throttled").write_text("0\n")
    cleared = health.throttling(tmp_path)
    assert cleared is not None
    assert not any(cleared["now"].values())


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


def test_fps_is_the_last_seconds_not_the_whole_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dashboard's fps recovers one window after a stall (it read 0.6-1.1 for a minute
    after a SIGSTOP of a minute while the agent ran at 2 fps again, over 1024 frame times)."""
    clock = [1000.0]
    monkeypatch.setattr("edgefleet.runtime.stats.time.monotonic", lambda: clock[0])
    stats = LoopStats(window=1024)
    assert stats.fps() == 0.0

    def run(seconds: float, rate: float) -> None:
        for _ in range(round(seconds * rate)):
            clock[0] += 1 / rate
            stats.record({"total": 1.0})

    run(3, 2.0)
    assert stats.fps() == pytest.approx(2.0)  # younger than the window: its own frames
    run(120, 2.0)
    assert stats.fps() == pytest.approx(2.0, abs=0.1)
    clock[0] += 60  # stopped for a minute
    assert stats.fps() == 0.0
    run(FPS_WINDOW_S + 0.5, 2.0)
    assert stats.fps() == pytest.approx(2.0, abs=0.1)
    run(5, 10.0)
    assert stats.fps() == pytest.approx(6.0, abs=0.2)  # half a window at 2, half at 10


def test_clock_synced_from_timesyncd_s_mark_or_the_kernel(tmp_path: Path) -> None:
    mark = tmp_path / "synchronized"
    kernel = health.clock_synced(mark)  # no mark: the kernel's flag (True/False), or None
    assert kernel in (True, False, None)
    mark.touch()
    assert health.clock_synced(mark) is True
