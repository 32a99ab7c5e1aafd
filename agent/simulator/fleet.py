"""Many virtual devices in one process, speaking the real protocol: ``edgefleet simulate``.

Each virtual device has its own MQTT connection (client id = device id) with a retained last
will; after subscribing it publishes its retained birth status; it sends predictions and
metrics at a set rate, numbered like the agent's spool (per-boot contiguous ``mseq``, a
``floor``) and kept until the collector acknowledges them, so that a collector in ``collector``
ack mode sees what it would see from real agents; it answers commands and walks the rollout
states when a desired release is retained for it or its group. A share of the devices really
downloads the release's chunks and checks every chunk's and the whole file's sha256; the rest
only walk the states (none of them checks signatures or runs a model: load, not trust).

One thread drives every connection through paho's external-loop hooks (socket callbacks,
``loop_read``/``loop_write``/``loop_misc`` on a selector): a connection costs a socket and a
few objects, no thread, which is what lets one process carry thousands.
"""

from __future__ import annotations

import contextlib
import heapq
import random
import selectors
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from edgefleet.mqtt.brokers import parse_urls
from edgefleet.simulator.device import Device, SimSettings, Stats

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike  # a typing-only Protocol in paho


class Simulator:
    """The devices and the one loop that drives all their sockets and timers."""

    def __init__(self, settings: SimSettings) -> None:
        self.s = settings
        # Load, not secrets: a seeded PRNG makes a run repeatable.
        self.rng = random.Random(settings.seed)  # noqa: S311
        self.stats = Stats()
        self.selector = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, Device, int]] = []
        self._tick = 0
        n = settings.devices
        # Exactly round(share * n) devices of each kind, chosen by the seed.
        downloaders = set(self.rng.sample(range(n), round(settings.download_share * n)))
        failing = set(self.rng.sample(range(n), round(settings.fail_share * n)))
        self.devices = [
            Device(self, i, downloads=i in downloaders, fails=i in failing) for i in range(n)
        ]
        self._pending = list(self.devices)  # not yet connected (first time or after a loss)
        self.latencies_from = time.monotonic() + settings.ack_from_s
        self._stopping = False

    # -- paho's socket hooks -------------------------------------------------------------
    def socket_opened(self, client: mqtt.Client, _u: Any, sock: SocketLike) -> None:
        self.selector.register(sock, selectors.EVENT_READ, client)

    def socket_closed(self, _c: mqtt.Client, _u: Any, sock: SocketLike) -> None:
        with contextlib.suppress(KeyError, ValueError):  # closed meanwhile
            self.selector.unregister(sock)

    def want_write(self, client: mqtt.Client, _u: Any, sock: SocketLike) -> None:
        with contextlib.suppress(KeyError, ValueError):  # closed meanwhile
            self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def done_writing(self, client: mqtt.Client, _u: Any, sock: SocketLike) -> None:
        with contextlib.suppress(KeyError, ValueError):  # closed meanwhile
            self.selector.modify(sock, selectors.EVENT_READ, client)

    # -- timers --------------------------------------------------------------------------
    def later(self, delay: float, device: Device, what: int) -> None:
        """``what`` >= 0: a rollout step; -1: predictions; -2: metrics."""
        self._tick += 1
        heapq.heappush(self.timers, (time.monotonic() + delay, self._tick, device, what))

    def lost(self, device: Device) -> None:
        if not self._stopping:
            device.retry_at = time.monotonic() + device.backoff * self.rng.uniform(0.5, 1.5)
            device.backoff = min(10.0, device.backoff * 2)
            self._pending.append(device)

    def flush(self, info: mqtt.MQTTMessageInfo, limit: float = 2.0) -> None:
        deadline = time.monotonic() + limit
        while not info.is_published() and time.monotonic() < deadline:
            self._poll(0.05)

    # -- the loop ------------------------------------------------------------------------
    def run(
        self,
        duration: float | None,
        report: Callable[[Simulator], None] | None = None,
        report_every: float = 10.0,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Connect, publish and answer until ``duration`` has passed or ``should_stop()``."""
        period = 1.0 / self.s.rate if self.s.rate > 0 else None
        for device in self.devices:
            if period is not None:
                self.later(self.rng.uniform(0, period), device, -1)
            self.later(self.rng.uniform(0, self.s.metrics_interval_s), device, -2)
        started = time.monotonic()
        next_connect = next_misc = started
        next_report = started + report_every
        while not should_stop() and (duration is None or time.monotonic() - started < duration):
            now = time.monotonic()
            if now >= next_connect:
                self._connect_some()
                next_connect = now + 0.1
            if now >= next_misc:
                for device in self.devices:
                    device.client.loop_misc()
                next_misc = now + 1.0
            self._fire(now, period)
            if report is not None and now >= next_report:
                report(self)
                next_report = now + report_every
            wait = 0.1 if not self.timers else max(0.0, min(0.1, self.timers[0][0] - now))
            self._poll(wait)

    def _connect_some(self) -> None:
        budget = max(1, int(self.s.connect_rate / 10))
        now = time.monotonic()
        later = []
        while self._pending and budget:
            device = self._pending.pop(0)
            if device.retry_at > now:
                later.append(device)
                continue
            budget -= 1
            if not device.connect():
                later.append(device)
        self._pending += later

    def _fire(self, now: float, period: float | None) -> None:
        while self.timers and self.timers[0][0] <= now:
            _, _, device, what = heapq.heappop(self.timers)
            if what == -1:
                device.predictions()
                if period is not None:
                    self.later(period, device, -1)
            elif what == -2:
                device.metrics()
                self.later(self.s.metrics_interval_s, device, -2)
            else:
                device.step(what)

    def _poll(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            client: mqtt.Client = key.data
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if mask & selectors.EVENT_WRITE:
                client.loop_write()

    def stop(self) -> None:
        self._stopping = True
        for device in self.devices:
            device.stop()
        self._poll(0.2)
        self.selector.close()

    def summary(self) -> dict[str, Any]:
        st = self.stats
        return {
            "devices": len(self.devices),
            "connected": sum(d.connected for d in self.devices),
            "published": dict(st.published),
            "unacked": sum(len(d.unacked) for d in self.devices),
            "acked": st.acked,
            "ack_latency_ms": {k: round(v, 1) for k, v in st.ack_percentiles().items()},
            "connects": st.connects,
            "disconnects": st.disconnects,
            "refused": st.refused,
            "commands": st.commands,
            "rollout_states": dict(st.rollouts),
            "chunk_errors": st.chunk_errors,
            "downloaded": st.downloaded,
        }


def settings_from(urls: str, **kwargs: Any) -> SimSettings:
    return SimSettings(brokers=parse_urls(urls), **kwargs)
