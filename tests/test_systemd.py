"""The systemd unit (verify, security score) and sd_notify against a real datagram socket."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from edgefleet.runtime.sdnotify import Notifier

from .conftest import REPO, cli_command
from .mqtt_helpers import wait_for

UNIT = REPO / "systemd" / "edgefleet.service"
CPU_ONLY = REPO / "systemd" / "edgefleet.service.d" / "cpu-only.conf.example"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


def _local_unit(tmp_path: Path, extra: Path | None = None) -> Path:
    # verify checks that ExecStart exists: point it at this checkout's venv.
    text = UNIT.read_text().replace(
        "/opt/edgefleet/venv/bin/edgefleet", str(Path(sys.executable).with_name("edgefleet"))
    )
    if extra is not None:
        text += "\n" + extra.read_text()
    unit = tmp_path / "edgefleet.service"
    unit.write_text(text)
    return unit


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False)


@needs_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    proc = _analyze("verify", str(_local_unit(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    text = UNIT.read_text()
    for key in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=",
        "Restart=on-failure",
        "StartLimitBurst=",
        "ExecStartPre=",
        "ExecReload=/opt/edgefleet/venv/bin/edgefleet reload --pid $MAINPID",
        "SystemCallErrorNumber=EPERM",
        "StateDirectory=edgefleet",
        "ConfigurationDirectory=edgefleet",
        "LoadCredential=mqtt-password",
    ):
        assert key in text, key


@needs_analyze
@pytest.mark.parametrize(("variant", "threshold"), [("full", "2.0"), ("cpu-only", "1.6")])
def test_security_exposure(tmp_path: Path, variant: str, threshold: str) -> None:
    unit = _local_unit(tmp_path, CPU_ONLY if variant == "cpu-only" else None)
    proc = _analyze(
        "security", "--offline=true", f"--threshold={int(float(threshold) * 10)}", str(unit)
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    score = float(proc.stdout.rsplit("exposure level for", 1)[1].split(":")[1].split()[0])
    assert score <= float(threshold)


class NotifySocket:
    """What systemd does: an AF_UNIX datagram socket the agent reports to."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        # Receive continuously so that each message is stamped when it arrives.
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def pump(self) -> None:
        time.sleep(0.06)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def has(self, field: str) -> bool:
        self.pump()
        return any(
            field in m.split("\n") or any(line.startswith(field) for line in m.split("\n"))
            for _, m in self.messages
        )

    def times(self, field: str) -> list[float]:
        self.pump()
        return [t for t, m in self.messages if field in m.split("\n")]


def _blocking_plugin(root: Path) -> None:
    """A third-party delegate that wraps the CPU one and hangs in invoke() on demand."""
    dist = root / "blocking_delegate-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: blocking-delegate\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[edgefleet.plugins]\nblocking = tp_blocking\n")
    (root / "tp_blocking.py").write_text(
        textwrap.dedent("""\
        import os, time
        from typing import Literal
        from edgefleet.plugin import hookimpl
        from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate

        class BlockingConfig(CpuConfig):
            type: Literal["blocking"] = "blocking"
            flag: str

        class Hanging:
            def __init__(self, inner, flag):
                self._inner, self._flag = inner, flag
            def __getattr__(self, name):
                return getattr(self._inner, name)
            def invoke(self):
                while os.path.exists(self._flag):
                    time.sleep(0.05)
                return self._inner.invoke()

        class BlockingDelegate(CpuDelegate):
            def make_interpreter(self, model_path):
                return Hanging(super().make_interpreter(model_path), self.config.flag)

        @hookimpl
        def edgefleet_register_delegates(registry):
            registry.add("blocking", BlockingConfig, BlockingDelegate, "hangs on demand")
        """)
    )


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def _start(
    tmp_path: Path,
    notify: NotifySocket,
    delegate: str = "{type: cpu, threads: 1}",
    watchdog_usec: int = 2_000_000,
) -> subprocess.Popen[bytes]:
    config = tmp_path / "agent.yaml"
    config.write_text(
        "source: {type: synthetic, fps: 20, width: 64, height: 48}\n"
        f"delegate: {delegate}\n"
        f"sinks: [{{type: jsonl, path: '{tmp_path / 'out.jsonl'}'}}]\n"
        f"state_dir: '{tmp_path}'\n"
    )
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": str(watchdog_usec),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )


def test_ready_watchdog_reload_stopping(tmp_path: Path, notify: NotifySocket) -> None:
    proc = _start(tmp_path, notify)
    try:
        wait_for(lambda: notify.has("READY=1"), 30, "READY=1")
        ready_at = notify.times("READY=1")[0]
        assert any(
            m.startswith("READY=1\nSTATUS=model efficientnet-lite0 v0") for _, m in notify.messages
        )
        time.sleep(4.2)
        pings = [t for t in notify.times("WATCHDOG=1") if t >= ready_at]
        assert 3 <= len(pings) <= 6, pings
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.7 <= g <= 1.4 for g in gaps), gaps  # half of WATCHDOG_USEC (2 s)

        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: notify.has("RELOADING=1"), 5, "RELOADING=1")
        reloading = next(m for _, m in notify.messages if "RELOADING=1" in m.split("\n"))
        assert "MONOTONIC_USEC=" in reloading
        wait_for(lambda: len(notify.times("READY=1")) >= 2, 5, "READY=1 after reload")
        assert proc.poll() is None

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        notify.pump()
        assert notify.has("STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_watchdog_stops_when_invoke_hangs(tmp_path: Path, notify: NotifySocket) -> None:
    _blocking_plugin(tmp_path)
    flag = tmp_path / "hang"
    proc = _start(tmp_path, notify, delegate=f"{{type: blocking, threads: 1, flag: '{flag}'}}")
    try:
        wait_for(lambda: notify.has("READY=1"), 30, "READY=1")
        wait_for(lambda: len(notify.times("WATCHDOG=1")) >= 2, 10, "pings while healthy")
        flag.touch()  # every invoke() from now on hangs
        time.sleep(1.5)
        frozen_at = time.monotonic()
        time.sleep(3.0)
        assert [t for t in notify.times("WATCHDOG=1") if t > frozen_at] == []
        flag.unlink()  # the device recovers: the pings come back
        wait_for(
            lambda: any(t > frozen_at + 3 for t in notify.times("WATCHDOG=1")),
            10,
            "pings after recovery",
        )
    finally:
        proc.kill()
        proc.wait(10)


def test_notifier_without_socket_is_silent() -> None:
    notifier = Notifier(environ={})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False
    assert Notifier(environ={"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_s is None


def test_abstract_socket(tmp_path: Path) -> None:
    name = f"edgefleet-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        notifier = Notifier(environ={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "4000000"})
        assert notifier.watchdog_s == 4.0
        notifier.ready("hello")
        assert sock.recv(100) == b"READY=1\nSTATUS=hello"
        notifier.close()
    finally:
        sock.close()


def test_reload_returns_once_applied_or_refused(tmp_path: Path) -> None:
    """`edgefleet reload` (the unit's ExecReload): SIGHUP, then wait for the agent's word."""
    state = tmp_path / "state"
    config = tmp_path / "agent.yaml"
    text = (
        "source: {type: synthetic, fps: 20, width: 64, height: 48}\n"
        f"sinks: []\nstate_dir: '{state}'\nlogging: {{format: json}}\nmodel: {{top_k: 5}}\n"
    )
    config.write_text(text)
    log = tmp_path / "agent.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            cli_command("run", "-c", str(config)), stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        # systemd sends reloads only after READY; here: after "agent running" is logged.
        wait_for(lambda: "agent running" in log.read_text(), 60, "the agent running")
        config.write_text(text.replace("top_k: 5", "top_k: 2"))
        ok = subprocess.run(
            cli_command("reload", "--pid", str(proc.pid), "--state-dir", str(state)),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == 'reloaded: {"top_k": 2}'
        config.write_text(text + "bogus: 1\n")
        refused = subprocess.run(
            cli_command("reload", "--pid", str(proc.pid), "--state-dir", str(state)),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert refused.returncode == 2
        assert "reload refused:" in refused.stderr
        assert "bogus: Extra inputs are not permitted" in refused.stderr
        assert proc.poll() is None  # still serving on the settings it had
    finally:
        proc.terminate()
        proc.wait(10)


def test_log_lines_carry_syslog_priorities_for_journald(tmp_path: Path) -> None:
    """Under journald (stderr is $JOURNAL_STREAM) each line starts with <priority>."""
    from edgefleet import logs

    out = (tmp_path / "journal").open("w+")
    st = os.fstat(out.fileno())
    old = os.environ.get("JOURNAL_STREAM")
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    try:
        logs.configure("info", "auto", out)
        log = structlog.get_logger("t")
        log.error("watchdog withheld")
        log.warning("link down")
        log.info("agent running")
        out.flush()
        lines = (tmp_path / "journal").read_text().splitlines()
    finally:
        if old is None:
            os.environ.pop("JOURNAL_STREAM", None)
        else:
            os.environ["JOURNAL_STREAM"] = old
        logs.configure("warning", "console")
        out.close()
    assert [line[:4] for line in lines] == ["<3>{", "<4>{", "<6>{"]
    assert '"event": "watchdog withheld"' in lines[0]
