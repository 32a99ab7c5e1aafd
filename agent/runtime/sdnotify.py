"""systemd notifications (sd_notify) and a watchdog that pings only while the agent works.

No-op when ``$NOTIFY_SOCKET`` is unset (a terminal, a container, the tests' own runs).
Abstract sockets (``@name``) are supported. ``WATCHDOG=1`` is sent every half
``$WATCHDOG_USEC`` (monotonic clock) only while the classification loop shows progress and
the agent's other threads are alive: a stuck ``invoke()`` or a dead thread stops the pings,
and systemd restarts the agent.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    """Sends datagrams to ``$NOTIFY_SOCKET``; silent where there is none."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        self.watchdog_s = self._watchdog_interval(env)
        self._sock: socket.socket | None = None

    @staticmethod
    def _watchdog_interval(env: os._Environ[str] | dict[str, str]) -> float | None:
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0:
            return None
        if pid and pid.isdigit() and int(pid) != os.getpid():
            return None  # the watchdog is meant for another process
        return int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            log.warning("sd_notify failed", error=str(exc))
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")


class Watchdog:
    """Pings ``WATCHDOG=1`` at half the interval while ``healthy()`` says the agent works."""

    def __init__(
        self, notifier: Notifier, healthy: Callable[[float], bool], status: Callable[[], str]
    ) -> None:
        self.notifier = notifier
        self.healthy = healthy
        self.status = status
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0
        self.withheld = 0

    def start(self) -> None:
        if self.notifier.watchdog_s is None or not self.notifier.enabled:
            return
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def _run(self) -> None:
        interval = self.notifier.watchdog_s
        if interval is None:
            return
        period = interval / 2
        next_at = time.monotonic()
        while not self._stop.is_set():
            if self.healthy(interval):
                self.notifier.send("WATCHDOG=1", f"STATUS={self.status()}")
                self.pings += 1
            else:
                self.withheld += 1
                if self.withheld == 1 or self.withheld % 10 == 0:
                    log.error("watchdog withheld: the loop made no progress", period_s=period)
            next_at += period
            self._stop.wait(max(0.0, next_at - time.monotonic()))
