"""A TCP proxy that misbehaves on request: the flaky Wi-Fi of a device, on loopback.

netem is not available here, so the faults are made in user space between a client and a
broker: latency (each direction, every byte), a bandwidth cap (each direction of each
connection), a stall (nothing forwarded for a while, then all of it), resets (every
connection closed with RST), and a half-open cut (both sockets stay open and are read,
nothing is forwarded: the client's TCP sees its data acknowledged, only the application can
tell that nobody answers). New connections are accepted during a cut and cut as well, as
through a dead access point.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field


@dataclass
class _Pipe:
    """One direction of one connection: bytes read, held, written when due."""

    src: socket.socket
    dst: socket.socket
    queue: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    ready: threading.Condition = field(default_factory=threading.Condition)
    closed: bool = False


class ChaosProxy:
    """``127.0.0.1:port`` forwards to ``127.0.0.1:target``; faults are switched at run time."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self.latency_s = 0.0
        self.rate_bytes_s = 0.0  # each direction of each connection at most this (0: any)
        self._stalled_until = 0.0
        self._cut = False
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._stop = threading.Event()
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, name="chaos-accept", daemon=True)

    def start(self) -> ChaosProxy:
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    # -- faults ---------------------------------------------------------------------------
    def stall(self, seconds: float) -> None:
        """Forward nothing for ``seconds`` (then everything held, in order)."""
        self._stalled_until = time.monotonic() + seconds

    def cut(self, on: bool = True) -> None:
        """Half-open: keep every socket open and read, forward nothing, answer nothing."""
        self._cut = on

    def reset(self) -> int:
        """Close every connection with RST (SO_LINGER 0); how many there were."""
        with self._lock:
            conns, self._conns = self._conns, []
        for pair in conns:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
        return len(conns)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._server.close()
        self.reset()

    # -- plumbing -------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.append((client, upstream))
                self.accepted += 1
            for pipe in (_Pipe(client, upstream), _Pipe(upstream, client)):
                threading.Thread(target=self._read, args=(pipe,), daemon=True).start()
                threading.Thread(target=self._write, args=(pipe,), daemon=True).start()

    def _read(self, pipe: _Pipe) -> None:
        while True:
            try:
                data = pipe.src.recv(65536)
            except OSError:
                data = b""
            with pipe.ready:
                if not data:
                    pipe.closed = True
                elif not self._cut:  # cut: read (the sender sees its bytes acked), drop
                    pipe.queue.append((time.monotonic() + self.latency_s, data))
                pipe.ready.notify()
            if not data:
                return

    def _write(self, pipe: _Pipe) -> None:
        while True:
            with pipe.ready:
                while not pipe.queue and not pipe.closed:
                    pipe.ready.wait(0.1)
                if not pipe.queue:
                    break
                due, data = pipe.queue[0]
            wait = max(due, self._stalled_until) - time.monotonic()
            if wait > 0 or self._cut:
                time.sleep(min(max(wait, 0.01), 0.05))
                continue
            with pipe.ready:
                pipe.queue.popleft()
            try:
                pipe.dst.sendall(data)
            except OSError:
                break
            if self.rate_bytes_s > 0:  # a slow link: the next bytes wait their turn
                time.sleep(len(data) / self.rate_bytes_s)
        with contextlib.suppress(OSError):
            pipe.dst.shutdown(socket.SHUT_WR)
