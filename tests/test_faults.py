"""The device's own faults, for real: a full state directory, a clock without RTC, a flaky
link (a TCP proxy of our own: ``tests/chaos.py``). Each runs ``edgefleet run`` against a
real mosquitto; the ground truth is what the agent's own jsonl sink wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.collector.collector import Collector, CollectorSettings
from edgefleet.operator.releases import Broker as Operator
from edgefleet.operator.releases import build_release, publish_release

from .chaos import ChaosProxy
from .conftest import REPO
from .mqtt_helpers import Broker, Subscriber, agent_config, running, wait_for

pytestmark = pytest.mark.slow
FP32 = REPO / "models" / "efficientnet-lite0-fp32.tflite"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


# -- a full state directory -------------------------------------------------------------------
@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``where`` (a state directory on a small SD card)."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the file system is full; the file (delete it to free the space)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 512)
    finally:
        os.close(fd)
    return filler


def _events(sub: Subscriber, name: str) -> list[dict[str, Any]]:
    """Events called ``name``, each once (a resent copy has the same boot id and mseq)."""
    unique = {}
    for message in sub.on("/events"):
        body = message.json()
        if body.get("event") == name:
            unique[(body["boot_id"], body["mseq"])] = body
    return list(unique.values())


def _statuses(sub: Subscriber) -> list[dict[str, Any]]:
    return [m.json() for m in sub.on("/status") if m.payload]


def _stored(db: Path) -> set[int]:
    if not db.exists():
        return set()
    con = sqlite3.connect(db)
    try:
        return {r[0] for r in con.execute("SELECT seq FROM predictions")}
    except sqlite3.OperationalError:
        return set()
    finally:
        con.close()


@needs_root
def test_a_full_state_directory_loses_nothing_says_so_once_and_recovers(
    tmp_path: Path, broker: Broker
) -> None:
    """Tried from outside before: an "outbox step failed" traceback 1.7 times a second and
    112 of 452 results lost, uncounted. Now: held in memory, one event each way, a status
    field, everything delivered once a collector acknowledges, SQLite intact."""
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    extra = "    ack_mode: collector\n    spool:\n      flush_after_s: 1\n"
    config = agent_config(tmp_path, broker.url, fps=20, mqtt_extra=extra)
    state = tmp_path / "state"
    db = tmp_path / "fleet.db"
    with small_disk(state, "16m"), running(config) as agent:
        wait_for(lambda: _statuses(sub) and _statuses(sub)[-1]["state"] == "online", 30, "up")
        filler = fill(state)
        # No collector yet: nothing is acknowledged, so the outbox must write, and cannot.
        wait_for(lambda: _events(sub, "state_dir_full"), 20, "the state_dir_full event")
        wait_for(lambda: _statuses(sub)[-1].get("state_dir", {}).get("full"), 10, "status")
        during = len(agent.truth())
        wait_for(lambda: len(agent.truth()) > during + 60, 30, "3 s more classified")
        filler.unlink()
        wait_for(lambda: _events(sub, "state_dir_ok"), 20, "the state_dir_ok event")
        assert _statuses(sub)[-1]["state_dir"] == {"writable": True, "full": False}
        collector = Collector(CollectorSettings(broker=broker.url, db=f"sqlite:///{db}"))
        collector.start()
        try:
            made = {r["seq"] for r in agent.truth()}
            wait_for(lambda: made <= _stored(db), 60, "every result stored")
        finally:
            collector.stop()
        assert agent.terminate() == 0
        assert len(_events(sub, "state_dir_full")) == 1  # once per spell, not per write
        log = agent.log.read_text()
        assert "outbox step failed" not in log
        assert log.count("state directory full") == 1
        check = sqlite3.connect(state / "spool.sqlite").execute("PRAGMA integrity_check")
        assert check.fetchone()[0] == "ok"
    metrics = [m.json() for m in sub.on("/metrics")]
    assert metrics[-1]["spool"]["dropped"] == 0
    sub.stop()


@needs_root
def test_past_its_memory_bound_a_full_disk_drops_the_oldest_and_counts_them(
    tmp_path: Path, broker: Broker
) -> None:
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/+/metrics"]).start()
    extra = (
        "    ack_mode: collector\n    spool:\n      flush_after_s: 0.5\n"
        "      memory_max_bytes: 65536\n"
    )
    config = agent_config(tmp_path, broker.url, fps=50, mqtt_extra=extra)
    state = tmp_path / "state"
    with small_disk(state, "16m"), running(config) as agent:
        wait_for(lambda: sub.on("/metrics"), 30, "metrics")
        filler = fill(state)

        def dropped() -> int:
            return int(sub.on("/metrics")[-1].json()["spool"]["dropped"])

        wait_for(lambda: dropped() > 0, 60, "drops counted in the metrics")
        made = len(agent.truth())
        wait_for(lambda: len(agent.truth()) > made + 50, 20, "the loop goes on")
        filler.unlink()
        wait_for(lambda: sub.on("/metrics")[-1].json()["state_dir"]["ok"], 20, "disk back")
        assert agent.terminate() == 0
    assert dropped() > 0
    sub.stop()


@needs_root
def test_a_rollout_download_stops_on_a_full_disk_and_resumes_when_space_returns(
    tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> None:
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    pem = keys[1].read_text().replace("\n", "\\n")
    extra = (
        f'rollout:\n  trusted_keys: {{release: "{pem}"}}\n  health_frames: 5\n  retry_min_s: 1\n'
    )
    config = agent_config(tmp_path, broker.url, fps=10, extra=extra)
    state = tmp_path / "state"
    manifest, blobs = build_release(
        {"cpu": FP32}, "lite0-float", 1, keys[0], "release", 3600, chunk_size=1 << 20
    )
    operator = Operator(broker.url)
    with small_disk(state, "64m"), running(config) as agent:
        wait_for(lambda: _statuses(sub) and _statuses(sub)[-1]["state"] == "online", 30, "up")
        filler = fill(state)
        publish_release(operator, manifest, blobs, ["device:dev-1"])

        def states() -> list[dict[str, Any]]:
            return [m.json() for m in sub.on("/rollout") if m.payload]

        wait_for(
            lambda: any("state directory full" in str(s.get("reason")) for s in states()),
            60,
            "the download stopped with its reason",
        )
        assert agent.proc.poll() is None
        filler.unlink()
        wait_for(lambda: states()[-1]["state"] == "active", 120, "resumed and active")
        assert agent.terminate() == 0
    operator.close()
    sub.stop()


# -- no real-time clock (libfaketime) -----------------------------------------------------------
FAKETIME = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))), None)
needs_faketime = pytest.mark.skipif(
    FAKETIME is None, reason="libfaketime not installed (apt install faketime)"
)


def _faketime_env(offset_file: Path) -> dict[str, str]:
    """The wall clock from ``offset_file`` (re-read each second), monotonic time untouched:
    a Pi without an RTC whose NTP sets (or jumps) the clock while it runs. (libfaketime
    0.9.10 in this mode fails clock_nanosleep with an absolute deadline, EINVAL, which
    CPython's time.sleep uses: the agent's daemon paths wait on conditions instead.)"""
    return {
        "LD_PRELOAD": str(FAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_CACHE_DURATION": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


@needs_faketime
@pytest.mark.parametrize("start", ["-400d", "+400d"])
def test_a_wrong_clock_that_jumps_mid_outage_loses_nothing(tmp_path: Path, start: str) -> None:
    offset = tmp_path / "faketime"
    offset.write_text(f"{start}\n")
    broker = Broker(tmp_path, persistence=True).start()
    sub = Subscriber(broker.port, ["edgefleet/v1/#"], client_id="observer", session_s=600)
    sub.start()
    config = agent_config(tmp_path, broker.url, fps=20)
    try:
        with running(config, _faketime_env(offset)) as agent:
            wait_for(lambda: len(sub.result_seqs()) >= 20, 60, "first results")
            device_ts = sub.on("/predictions")[-1].json()["ts"]
            assert abs(device_ts - time.time()) > 300 * 86400  # it really is off
            broker.stop()
            offset.write_text("+2d\n")  # NTP, mid-outage: a jump of hundreds of days
            made_before = len(agent.truth())
            wait_for(lambda: len(agent.truth()) > made_before + 60, 30, "3 s offline")
            stopped = time.monotonic()
            broker.start()
            wait_for(lambda: _back_online(sub, agent), 30, "back online")
            reconnect_s = time.monotonic() - stopped
            made = {r["seq"] for r in agent.truth()}
            wait_for(lambda: made <= set(sub.result_seqs()), 60, "the backlog")
            assert agent.terminate() == 0
        assert reconnect_s <= 7.5, reconnect_s  # the backoff never grew with the wall clock
        metrics = [m.json() for m in sub.on("/metrics")]
        assert metrics[-1]["spool"]["dropped"] == 0  # no message aged out by the jump
    finally:
        sub.stop()
        broker.stop()


def _back_online(sub: Subscriber, agent: Any) -> bool:
    statuses = [m.json() for m in sub.on("/status") if m.payload]
    return len([s for s in statuses if s.get("state") == "online"]) >= 2


@needs_faketime
def test_tls_with_a_certificate_not_yet_valid_by_the_device_s_clock_is_one_clear_line(
    tmp_path: Path,
) -> None:
    from .certs import CA

    ca = CA(tmp_path)
    cert, key = ca.issue("localhost", server=True)
    broker = Broker(
        tmp_path,
        extra=f"cafile {ca.cert_path}\ncertfile {cert}\nkeyfile {key}\n",
    ).start()
    offset = tmp_path / "faketime"
    offset.write_text("-400d\n")  # booted without RTC, before NTP: the certificate is "future"
    config = agent_config(tmp_path, f"mqtts://localhost:{broker.port}", fps=5)
    config.write_text(config.read_text() + f"  tls: {{ca: {ca.cert_path}}}\n  reconnect_max_s: 1\n")
    try:
        with running(config, _faketime_env(offset)) as agent:
            wait_for(lambda: broker.log_lines("New connection from") >= 4, 60, "4 attempts")
            lines = [line for line in agent.log.read_text().splitlines() if "TLS" in line]
            assert len(lines) == 1, lines
            event = json.loads(lines[0])
            assert "is not valid yet by this device's clock" in event["reason"]
            assert "NTP" in event["reason"]
            offset.write_text("+0d\n")  # NTP sets the clock: it connects
            wait_for(
                lambda: any("mqtt online" in line for line in agent.log.read_text().splitlines()),
                30,
                "online once the clock is right",
            )
            assert agent.terminate() == 0
    finally:
        broker.stop()


# -- a flaky link ------------------------------------------------------------------------------
def test_a_flaky_link_delivers_everything_and_a_half_open_cut_is_noticed(tmp_path: Path) -> None:
    """Latency, a stall, resets and a half-open cut between the agent and its broker: every
    result arrives (duplicates carry the same boot id and seq), none is missing, and the cut
    is noticed by the link's own silence check within one keepalive interval."""
    broker = Broker(tmp_path).start()
    proxy = ChaosProxy(broker.port).start()
    sub = Subscriber(broker.port, ["edgefleet/v1/#"]).start()
    extra = "    keepalive_s: 6\n"
    config = agent_config(tmp_path, proxy.url, fps=20, mqtt_extra=extra)
    try:
        with running(config) as agent:
            wait_for(lambda: len(sub.result_seqs()) >= 20, 30, "first results")

            def more(n: int) -> None:
                seen = len(sub.result_seqs())
                wait_for(lambda: len(sub.result_seqs()) >= seen + n, 60, f"{n} more")

            proxy.latency_s = 0.2
            more(40)
            proxy.stall(4.0)  # under the keepalive: the connection survives it
            more(40)
            proxy.latency_s = 0.0
            assert proxy.reset() >= 1
            more(40)
            cut_at = time.monotonic()
            proxy.cut()
            wait_for(lambda: _silent(agent), 20, "the silence noticed")
            noticed_s = time.monotonic() - cut_at
            proxy.cut(False)
            proxy.reset()  # what the dead access point held is gone with it
            more(40)
            made = {r["seq"] for r in agent.truth()}
            wait_for(lambda: made <= set(sub.result_seqs()), 60, "everything made")
            assert agent.terminate() == 0
        seqs = sub.result_seqs()
        truth = {r["seq"] for r in agent.truth()}
        missing = truth - set(seqs)
        assert not missing, sorted(missing)[:20]
        boot = {r["boot_id"] for r in agent.truth()}
        assert {r["boot_id"] for m in sub.on("/predictions") for r in m.json()["results"]} == boot
        print(f"flaky link: {len(truth)} results, {len(seqs) - len(set(seqs))} duplicates, "
              f"half-open cut noticed after {noticed_s:.1f} s (keepalive 6 s)")  # fmt: skip
        assert noticed_s < 6 * 1.5 + 1  # before paho's own keepalive would have
    finally:
        sub.stop()
        proxy.stop()
        broker.stop()


def _silent(agent: Any) -> bool:
    return any(e.get("event") == "mqtt link silent, reconnecting" for e in agent.logs())


def test_the_paho_internals_the_silence_check_reads_are_there() -> None:
    """The link sends paho's PINGREQ and reads whether one is out: a paho that renamed
    them would leave only its own keepalive; this says so at once."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    assert client._ping_t == 0
    assert callable(client._send_pingreq)
    assert callable(client._sock_close)


def test_a_reason_that_only_changed_its_numbers_is_not_logged_again() -> None:
    """The not-yet-valid certificate's reason carries the clock's minute: when the minute
    turned during the retries it was logged a second time (seen 2026-12-07)."""
    from edgefleet.mqtt.liveness import same_reason, unreachable_reason

    class NotYetValidError(OSError):
        verify_code = 9

    first = unreachable_reason(NotYetValidError())
    later = first.replace(first.split("(")[1][:16], "2025-11-02 03:13")
    assert later != first
    assert same_reason(later, first)
    assert not same_reason("broker unreachable: [Errno 111] Connection refused", first)
