"""The collector's web server: fleet and device pages, JSON API, live events, ``/metrics``.

``edgefleet collect ... --http 127.0.0.1:8080``. Standard library HTTP (one thread per
connection), pages shipped in the package (no CDN: control rooms are often offline). Live
updates are server-sent events from one broadcaster thread: once a second it computes the
fleet's rows, and every open page gets only the rows that changed (and the summary), so a
device turning stale or offline reaches the page without a message from it.

Authentication: a token read from a file, sent as ``Authorization: Bearer TOKEN`` or as the
password of HTTP basic auth (what a browser asks for). Required when the server binds beyond
loopback; compared in constant time.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import ipaddress
import json
import queue
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog

from edgefleet.dashboard import samplesapi
from edgefleet.dashboard.promexport import exposition
from edgefleet.dashboard.samplesapi import SampleBook
from edgefleet.dashboard.view import FleetView
from edgefleet.errors import UserError

log = structlog.get_logger(__name__)

STATIC = {
    "style.css": "text/css; charset=utf-8",
    "fleet.js": "text/javascript; charset=utf-8",
    "device.js": "text/javascript; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "samples.js": "text/javascript; charset=utf-8",
}
PAGES = {"fleet": "index.html", "device": "device.html", "samples": "samples.html"}
TICK_S = 1.0
HEARTBEAT_S = 5.0
MAX_CLIENTS = 64
CLIENT_BACKLOG = 30  # queued updates per page; a page that falls further behind is dropped


def parse_bind(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6); ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
        raise ValueError(f"{text!r}: use HOST:PORT, e.g. 127.0.0.1:8080")
    host = host.strip("[]")
    if not host:
        raise ValueError(f"{text!r}: give the address to bind, e.g. 127.0.0.1:{port}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _asset(name: str) -> bytes:
    return resources.files("edgefleet.dashboard").joinpath("web").joinpath(name).read_bytes()


class Broadcaster:
    """One thread computes the fleet once per tick and hands each page what changed."""

    def __init__(self, view: FleetView) -> None:
        self.view = view
        self._clients: list[queue.Queue[bytes | None]] = []
        self._lock = threading.Lock()
        self._sent: dict[str, tuple[int, str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-events", daemon=True)
        self.dropped_clients = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for client in self._clients:
                _close(client)
        self._thread.join(5)

    def subscribe(self) -> queue.Queue[bytes | None] | None:
        """A new page's queue, with the whole fleet as its first event; None when full."""
        client: queue.Queue[bytes | None] = queue.Queue(maxsize=CLIENT_BACKLOG + 1)
        client.put_nowait(_event("fleet", {**self.view.fleet(), "full": True}))
        with self._lock:
            if len(self._clients) >= MAX_CLIENTS:
                return None
            self._clients.append(client)
        return client

    def unsubscribe(self, client: queue.Queue[bytes | None]) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)

    def _run(self) -> None:
        version = -1
        while not self._stop.is_set():
            version = self.view.wait_change(version, TICK_S)
            try:
                payload = self._delta()
            except Exception:  # a bad row never ends the live updates
                log.exception("dashboard: update failed")
                payload = None
            if payload is not None:
                self._fan_out(payload)
            self._stop.wait(TICK_S)  # at most one update a second, however busy the fleet

    def _delta(self) -> bytes | None:
        # A row goes out on a new message or a state the clock changed (stale); the page
        # ages rows by itself between updates.
        changed, removed, summary, self._sent = self.view.changes(self._sent)
        if not changed and not removed:
            return None
        body = {"ts": self.view.clock(), "summary": summary, "devices": changed}
        return _event("fleet", {**body, "removed": removed})

    def _fan_out(self, payload: bytes) -> None:
        with self._lock:
            for client in list(self._clients):
                try:
                    client.put_nowait(payload)
                except queue.Full:  # that page stopped reading: it gets closed, never waited for
                    self._clients.remove(client)
                    self.dropped_clients += 1
                    _close(client)


def _close(client: queue.Queue[bytes | None]) -> None:
    """Empty a page's queue and leave only the end-of-stream mark in it."""
    while True:
        try:
            client.get_nowait()
        except queue.Empty:
            break
    client.put_nowait(None)


def _event(name: str, body: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


class Dashboard:
    """The HTTP server around a fleet view."""

    def __init__(
        self,
        view: FleetView,
        bind: str,
        token: str | None = None,
        counters: Callable[[], dict[str, int]] = dict,
        device_histograms: bool = False,
        samples: SampleBook | None = None,
    ) -> None:
        self.samples = samples
        try:
            host, port = parse_bind(bind)
        except ValueError as exc:
            raise UserError(f"--http {exc}") from None
        if token is None and not is_loopback(host):
            raise UserError(
                f"--http {bind}: binding beyond loopback needs --http-token-file "
                "(anyone on the network could read the fleet)"
            )
        self.view = view
        self.token = token
        self.counters = counters
        self.device_histograms = device_histograms
        self.events = Broadcaster(view)
        handler = type("Handler", (_Handler,), {"dashboard": self})
        try:
            self.server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise UserError(f"--http {bind}: {exc.strerror or exc}") from None
        self.server.daemon_threads = True
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="dashboard-http", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        text = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{text}]" if ":" in text else text
        return f"http://{shown}:{port}/"

    def start(self) -> None:
        self.events.start()
        self._thread.start()

    def stop(self) -> None:
        self.events.stop()
        self.server.shutdown()
        self.server.server_close()

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        offered = value.strip()
        if scheme.lower() == "basic":
            credentials = _basic(offered)
            if credentials is None:
                return False
            offered = credentials[1]
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def user(self, header: str | None) -> str:
        """Who sent an authorized request: basic auth's user name, else how they came."""
        if self.token is None:
            return "local"
        scheme, _, value = (header or "").partition(" ")
        credentials = _basic(value.strip()) if scheme.lower() == "basic" else None
        if credentials is None:
            return "token"
        return credentials[0] or "operator"


def _basic(value: str) -> tuple[str, str] | None:
    """(user, password) of an HTTP basic credential; None when it does not decode."""
    try:
        user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user, password


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard
    server_version = "edgefleet-collector"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        log.debug("dashboard request", line=format % args)

    def _refused(self) -> bool:
        if self.dashboard.authorized(self.headers.get("Authorization")):
            return False
        self._send(
            HTTPStatus.UNAUTHORIZED,
            b"authentication required\n",
            "text/plain; charset=utf-8",
            {"WWW-Authenticate": 'Basic realm="edgefleet", charset="UTF-8"'},
        )
        return True

    def do_GET(self) -> None:
        if self._refused():
            return
        parts = urlsplit(self.path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the page went away
            answer = samplesapi.get(self.dashboard.samples, parts.path, parts.query)
            if answer is not None:
                self._send(*answer)
            else:
                self._route(parts.path)

    def do_POST(self) -> None:
        if self._refused():
            return
        text = self.headers.get("Content-Length") or "0"
        length = int(text) if text.isdigit() else -1
        if not 0 <= length <= samplesapi.MAX_BODY:
            self._json({"error": "body too large"}, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            self.close_connection = True
            return
        body = self.rfile.read(length)
        user = self.dashboard.user(self.headers.get("Authorization"))
        answer = samplesapi.post(
            self.dashboard.samples,
            urlsplit(self.path).path,
            self.headers.get("Content-Type") or "",
            body,
            user,
        )
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._send(*answer)

    def _route(self, path: str) -> None:
        view = self.dashboard.view
        if path == "/samples":
            self._send(HTTPStatus.OK, _asset(PAGES["samples"]), "text/html; charset=utf-8")
        elif path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, _asset(PAGES["fleet"]), "text/html; charset=utf-8")
        elif path.startswith("/device/"):
            self._send(HTTPStatus.OK, _asset(PAGES["device"]), "text/html; charset=utf-8")
        elif path.startswith("/static/") and path.removeprefix("/static/") in STATIC:
            name = path.removeprefix("/static/")
            self._send(HTTPStatus.OK, _asset(name), STATIC[name])
        elif path == "/api/fleet":
            self._send(HTTPStatus.OK, view.fleet_json(), "application/json")
        elif path.startswith("/api/devices/"):
            body = view.device(unquote(path.removeprefix("/api/devices/")))
            if body is None:
                self._json({"error": "no such device"}, HTTPStatus.NOT_FOUND)
            else:
                self._json(body)
        elif path == "/api/events":
            self._stream()
        elif path == "/metrics":
            text = exposition(view, self.dashboard.counters, self.dashboard.device_histograms)
            self._send(HTTPStatus.OK, text, "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/healthz":
            self._send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
        else:
            self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)

    def _json(self, body: dict[str, Any], status: HTTPStatus = HTTPStatus.OK) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self._send(status, data, "application/json")

    def _send(
        self,
        status: HTTPStatus,
        data: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _stream(self) -> None:
        events = self.dashboard.events
        client = events.subscribe()
        if client is None:
            self._json({"error": "too many live pages"}, HTTPStatus.SERVICE_UNAVAILABLE)
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            while True:
                try:
                    payload = client.get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    # Lets the page tell a quiet fleet from a lost connection.
                    payload = _event("ping", {})
                if payload is None:
                    return
                self.wfile.write(payload)
                self.wfile.flush()
        finally:
            events.unsubscribe(client)
