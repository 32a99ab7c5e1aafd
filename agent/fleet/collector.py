"""The fleet-side collector: stores what devices report, and acknowledges it.

``edgefleet collect --broker mqtt://host --db sqlite:///fleet.db`` (or ``postgresql://...``).
Messages are stored idempotently (a result by boot id + seq, a message by boot id + mseq),
so re-sent messages are harmless. After each commit the collector publishes, per device boot,
the highest *contiguous* mseq it has stored to ``{prefix}/devices/{id}/ack``: devices in
``collector`` ack mode delete their spool only up to there, so a broker that dies without
persistence loses nothing. Each message's ``floor`` tells the collector below which mseq the
device holds nothing more (acked or dropped), so gaps the device can never fill do not stall
the acks.

With MQTT 5, predictions/metrics are read through a shared subscription (``$share/GROUP/...``)
so several collectors can split the load; status is read by each (retained messages are not
delivered to shared subscriptions).
"""

from __future__ import annotations

import json
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.errors import UserError
from edgefleet.fleet.view import FleetView
from edgefleet.fleet.watch import feed
from edgefleet.mqtt.brokers import next_broker, no_delay, parse_urls
from edgefleet.protocol import (
    DEFAULT_PREFIX,
    MAX_JSON_DEPTH,
    SPOOLED_KINDS,
    FleetTopics,
    json_depth,
    loads,
)

log = structlog.get_logger(__name__)
SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason: a login with the same client id
TAKEN_OVER_RETRY_S = 60
# (kind, device, body) of each stored message, for a live display
Echo = Callable[[str, str, dict[str, Any]], None]

TABLES = [
    """CREATE TABLE IF NOT EXISTS device_status (
        device TEXT PRIMARY KEY, state TEXT NOT NULL, boot_id TEXT, ts DOUBLE PRECISION,
        payload TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS messages (
        boot_id TEXT NOT NULL, mseq BIGINT NOT NULL, device TEXT NOT NULL, kind TEXT NOT NULL,
        ts DOUBLE PRECISION, replayed BOOLEAN NOT NULL, payload TEXT NOT NULL,
        PRIMARY KEY (boot_id, mseq))""",
    """CREATE TABLE IF NOT EXISTS predictions (
        boot_id TEXT NOT NULL, seq BIGINT NOT NULL, device TEXT NOT NULL,
        ts DOUBLE PRECISION, model TEXT, model_version BIGINT, label TEXT, score DOUBLE PRECISION,
        payload TEXT NOT NULL, PRIMARY KEY (boot_id, seq))""",
    """CREATE TABLE IF NOT EXISTS acks (
        boot_id TEXT PRIMARY KEY, device TEXT NOT NULL, mseq BIGINT NOT NULL)""",
]


class _Cursor(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[tuple[Any, ...]]: ...


_Stored = tuple[str, str, dict[str, Any]]  # kind, device, body: for the echo, after commit


def _lenient_object(payload: bytes) -> dict[str, Any]:
    """Depth still bounded, NaN allowed: enough to read a rejected message's place."""
    if json_depth(payload) > MAX_JSON_DEPTH:
        raise ValueError("JSON nested too deep")
    body = json.loads(payload)
    if not isinstance(body, dict):
        raise TypeError("not a JSON object")
    return body


def _place(body: dict[str, Any]) -> tuple[str, int, int]:
    """A spooled message's (boot_id, mseq, floor), checked: they feed the acknowledgement."""
    boot_id, mseq, floor = body.get("boot_id"), body.get("mseq"), body.get("floor", 1)
    if not isinstance(boot_id, str) or not 1 <= len(boot_id) <= 64:
        raise ValueError("boot_id must be a string of 1..64 characters")
    return boot_id, _counter("mseq", mseq), _counter("floor", floor)


def _counter(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**62:
        raise ValueError(f"{name} must be a positive integer below 2**62")
    return value


def _json_object(payload: bytes) -> dict[str, Any]:
    body = loads(payload)
    if not isinstance(body, dict):
        raise TypeError("not a JSON object")
    return body


# Stored message numbers read per query while finding how far a boot is contiguous.
ADVANCE_PAGE = 500
# Advisory lock key that serialises schema creation between collectors ("edgeflt" in ASCII).
SCHEMA_LOCK = 0x65646765666C74


class Store:
    """SQLite or PostgreSQL with the same SQL (only the placeholder differs)."""

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        self.kind = parts.scheme
        if self.kind == "sqlite":
            # sqlite:///relative.db or sqlite:////absolute/path.db, as SQLAlchemy spells it.
            if not url.startswith("sqlite:///"):
                raise UserError(f"database URL {url!r}: use sqlite:///PATH")
            path = Path(url.removeprefix("sqlite:///"))
            if not path.parent.is_dir():
                # Never create folders on a guess: a typo would scatter databases about.
                raise UserError(f"database {path}: folder {path.parent} does not exist")
            try:
                self.conn: Any = sqlite3.connect(path, check_same_thread=False)
            except sqlite3.Error as exc:
                raise UserError(f"database {path}: {exc}") from None
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.ph = "?"
        elif self.kind in ("postgresql", "postgres"):
            try:
                import psycopg
            except ImportError:
                raise UserError(
                    "PostgreSQL needs psycopg: pip install 'edgefleet[collector]'"
                ) from None
            try:
                self.conn = psycopg.connect(url)
            except psycopg.Error as exc:
                raise UserError(f"cannot connect to {parts.hostname}: {exc}") from None
            self.ph = "%s"
        else:
            raise UserError(f"database URL {url!r}: use sqlite:///PATH or postgresql://...")
        cur = self.conn.cursor()
        if self.ph == "%s":
            # Collectors started together on an empty database would race: PostgreSQL's
            # CREATE TABLE IF NOT EXISTS is not atomic against a concurrent one (one of them
            # fails on pg_type's unique index). One at a time, for this transaction.
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        for ddl in TABLES:
            cur.execute(ddl)
        self.conn.commit()

    def describe(self) -> str:
        """The database, without a password."""
        parts = urlsplit(self.url)
        if parts.password:
            return self.url.replace(f":{parts.password}@", ":***@")
        return self.url

    def _q(self, sql: str) -> str:
        return sql.replace("?", self.ph)

    def cursor(self) -> _Cursor:
        cur: _Cursor = self.conn.cursor()
        return cur

    def save_status(self, cur: _Cursor, device: str, body: dict[str, Any]) -> None:
        cur.execute(
            self._q(
                "INSERT INTO device_status(device, state, boot_id, ts, payload) VALUES (?,?,?,?,?) "
                "ON CONFLICT(device) DO UPDATE SET state=excluded.state, boot_id=excluded.boot_id, "
                "ts=excluded.ts, payload=excluded.payload"
            ),
            (device, str(body.get("state")), body.get("boot_id"), body.get("ts"), json.dumps(body)),
        )

    def save_message(self, cur: _Cursor, kind: str, device: str, body: dict[str, Any]) -> None:
        boot_id, mseq = str(body["boot_id"]), int(body["mseq"])
        cur.execute(
            self._q(
                "INSERT INTO messages(boot_id, mseq, device, kind, ts, replayed, payload) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"
            ),
            (
                boot_id,
                mseq,
                device,
                kind,
                body.get("ts"),
                bool(body.get("replayed")),
                json.dumps(body),
            ),
        )
        for result in body.get("results", []) if kind == "predictions" else []:
            top = result.get("top") or [{}]
            cur.execute(
                self._q(
                    "INSERT INTO predictions(boot_id, seq, device, ts, model, model_version, "
                    "label, score, payload) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"
                ),
                (
                    str(result["boot_id"]),
                    int(result["seq"]),
                    device,
                    result.get("ts"),
                    result.get("model"),
                    result.get("model_version"),
                    top[0].get("label"),
                    top[0].get("score"),
                    json.dumps(result),
                ),
            )

    def save_rejected(self, cur: _Cursor, device: str, boot_id: str, mseq: int, error: str) -> None:
        cur.execute(
            self._q(
                "INSERT INTO messages(boot_id, mseq, device, kind, ts, replayed, payload) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"
            ),
            (boot_id, mseq, device, "rejected", None, False, json.dumps({"error": error[:500]})),
        )

    def advance(self, cur: _Cursor, device: str, boot_id: str, floor: int) -> int:
        """Highest mseq of ``boot_id`` stored with nothing missing above ``floor - 1``."""
        cur.execute(self._q("SELECT mseq FROM acks WHERE boot_id = ?"), (boot_id,))
        row = cur.fetchone()
        contiguous = max(int(row[0]) if row else 0, floor - 1)
        # A page of stored numbers per query, not a query per number: a round trip to
        # PostgreSQL costs more than the rows (bench/collector.py: 22-27% less per step).
        while True:
            cur.execute(
                self._q(
                    "SELECT mseq FROM messages WHERE boot_id = ? AND mseq > ? ORDER BY mseq LIMIT ?"
                ),
                (boot_id, contiguous, ADVANCE_PAGE),
            )
            run = 0
            for (mseq,) in cur.fetchall():
                if int(mseq) != contiguous + 1:
                    break  # a gap: the ack stops below it
                contiguous += 1
                run += 1
            if run < ADVANCE_PAGE:  # a gap, or the end of what is stored
                break
        cur.execute(
            self._q(
                "INSERT INTO acks(boot_id, device, mseq) VALUES (?,?,?) "
                "ON CONFLICT(boot_id) DO UPDATE SET mseq=excluded.mseq"
            ),
            (boot_id, device, contiguous),
        )
        return contiguous

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    def close(self) -> None:
        self.conn.close()


@dataclass
class CollectorSettings:
    broker: str
    db: str = "sqlite:///edgefleet-collector.db"
    prefix: str = DEFAULT_PREFIX
    protocol: str = "5"
    share_group: str | None = "edgefleet-collectors"
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


class Collector:
    """Subscribes, stores in batches, acks after each commit."""

    def __init__(
        self,
        settings: CollectorSettings,
        echo: Echo | None = None,
        say: Callable[[str], None] | None = None,
        view: FleetView | None = None,
    ) -> None:
        self.s = settings
        self.echo = echo  # for live display
        self.view = view  # the dashboard's live state: fed what is stored, after commit
        self.say = say or (lambda _text: None)  # connection news for a person watching
        self._failures = 0
        # A comma list names brokers of one cluster: start at a random one, paho's own
        # reconnection moves to the next after a failure. Checked before the database opens.
        self.brokers = parse_urls(settings.broker)
        self.store = Store(settings.db)
        self._broker = random.randrange(len(self.brokers))  # noqa: S311 - load spreading
        self.host, self.port, self.tls = self.brokers[self._broker]
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=100_000)
        self._stop = threading.Event()
        self.stored = 0
        self.rejected = 0
        self.connected = threading.Event()
        self.client = self._make_client()
        self._worker = threading.Thread(target=self._run, name="collector-store", daemon=True)

    def _make_client(self) -> mqtt.Client:
        v5 = self.s.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.s.client_id or f"edgefleet-collector-{int(time.time() * 1000) % 10**9}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        )
        if self.s.username is not None:
            client.username_pw_set(self.s.username, self.s.password)
        if self.tls:
            client.tls_set(
                ca_certs=str(self.s.ca) if self.s.ca else None,
                certfile=str(self.s.cert) if self.s.cert else None,
                keyfile=str(self.s.key) if self.s.key else None,
            )
        client.reconnect_delay_set(1, 10)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        return client

    def _rotate(self, client: mqtt.Client) -> None:
        if not self._stop.is_set():
            self._broker = next_broker(client, self.brokers, self._broker)
            self.host, self.port, _ = self.brokers[self._broker]

    def _on_connect_fail(self, client: mqtt.Client, _userdata: Any) -> None:
        # paho retries with its backoff (1 s doubling to 10 s); say so, less often over time.
        self._rotate(client)
        self._failures += 1
        if self._failures in (1, 2, 5) or self._failures % 30 == 0:
            self.say(
                f"collector: cannot reach {self.host}:{self.port} "
                f"({self._failures} attempts); retrying every 1-10 s"
            )

    def subscriptions(self) -> list[str]:
        topics = FleetTopics(self.s.prefix)
        shared = self.s.protocol == "5" and self.s.share_group
        data = [topics.every_device(leaf) for leaf in SPOOLED_KINDS]
        if shared:
            data = [f"$share/{self.s.share_group}/{topic}" for topic in data]
        watched = []
        if self.view is not None:
            # Read-only for the view (not stored): rollout states and desired models, retained.
            watched = [
                topics.every_device("rollout"),
                topics.every_device("model/desired"),
                topics.every_group("model/desired"),
            ]
        return [topics.every_device("status"), *data, *watched]

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        if rc.is_failure:
            log.error("collector: broker refused connection", reason=str(rc))
            self.say(f"collector: {self.host}:{self.port} refused the connection: {rc}")
            return
        no_delay(client)  # acks go out at once, not behind Nagle's algorithm
        client.subscribe([(topic, 1) for topic in self.subscriptions()])
        self.connected.set()
        self._failures = 0
        log.info("collector connected", broker=f"{self.host}:{self.port}")
        self.say(f"collector: connected to {self.host}:{self.port}")

    def _on_disconnect(
        self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        self.connected.clear()
        if self._stop.is_set():
            return
        if rc.value == SESSION_TAKEN_OVER:
            # Another collector logged in with this identity (the shipped broker makes the
            # user name the client id): coming straight back would only throw it out in turn.
            log.error(
                "another client logged in with this collector's identity and took its session; "
                "give each collector its own (edgefleet broker add-collector); retrying slowly",
                retry_in_s=TAKEN_OVER_RETRY_S,
            )
            client.reconnect_delay_set(TAKEN_OVER_RETRY_S, TAKEN_OVER_RETRY_S)
        else:
            log.warning("collector disconnected", reason=str(rc))
            client.reconnect_delay_set(1, 10)
        self._rotate(client)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if self.view is not None and self._watch(self.view, msg.topic, bytes(msg.payload)):
            return
        try:
            self._inbox.put_nowait((msg.topic, bytes(msg.payload)))
        except queue.Full:
            self.rejected += 1  # not acked, so the devices keep it and send it again

    def _watch(self, view: FleetView, topic: str, payload: bytes) -> bool:
        """Rollout states and desired models go to the view only; False for what is stored."""
        if not topic.endswith(("/rollout", "/model/desired")):
            return False
        return feed(view, topic, payload)

    def start(self) -> None:
        self._worker.start()
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        self._stop.set()
        self._worker.join(5)
        self.client.disconnect()
        self.client.loop_stop()
        self.store.close()

    def _drain(self, limit: int = 500) -> list[tuple[str, bytes]]:
        items = []
        try:
            items.append(self._inbox.get(timeout=0.1))
            while len(items) < limit:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return items

    def _run(self) -> None:
        while not self._stop.is_set() or not self._inbox.empty():
            batch = self._drain()
            if batch:
                try:
                    self._store_batch(batch)
                except Exception:
                    log.exception("collector batch failed; not acked, devices will resend")
                    self.store.rollback()

    def _store_one(
        self, cur: _Cursor, device: str, kind: str, payload: bytes, stored: list[_Stored]
    ) -> tuple[str, str, int] | None:
        """Store one message; (device, boot_id, floor) when it counts toward an ack."""
        body = _json_object(payload)
        if kind == "status":
            self.store.save_status(cur, device, body)
            stored.append((kind, device, body))
            return None
        boot_id, _, floor = _place(body)
        self.store.save_message(cur, kind, device, body)
        stored.append((kind, device, body))
        # The newest floor is the highest: the device only ever lets go of old messages.
        return device, boot_id, floor

    def _reject(
        self, cur: _Cursor, device: str, payload: bytes, exc: Exception
    ) -> tuple[str, str, int] | None:
        """Count a message that cannot be stored; keep its place when it names one.

        A message that still says which boot and mseq it is gets a ``rejected`` row, so the
        acknowledgement moves past it: a device resending it forever would stall every
        message behind it. One that does not say is only counted and logged.
        """
        self.rejected += 1
        log.warning("collector: message rejected", device=device, error=type(exc).__name__)
        try:
            boot_id, mseq, floor = _place(_lenient_object(payload))
        except Exception:  # noqa: BLE001 - nothing usable in it: counted, skipped
            return None
        cur.execute("SAVEPOINT rejected")
        try:
            self.store.save_rejected(cur, device, boot_id, mseq, f"{type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001
            cur.execute("ROLLBACK TO SAVEPOINT rejected")
            cur.execute("RELEASE SAVEPOINT rejected")
            return None
        cur.execute("RELEASE SAVEPOINT rejected")
        return device, boot_id, floor

    def _store_batch(self, batch: list[tuple[str, bytes]]) -> None:
        """Store a batch in one transaction, then acknowledge what it completed.

        Fast path: the whole batch as it is. When one message fails (malformed, hostile, too
        large for a column) the transaction is rolled back and the batch stored again with a
        savepoint per message, so that message is undone alone and every other one commits.
        """
        try:
            touched, stored = self._store_all(batch, isolate=False)
        except Exception:  # noqa: BLE001 - a bad message: again, one message at a time
            self.store.rollback()
            touched, stored = self._store_all(batch, isolate=True)
        acks = {
            key: self.store.advance(self.store.cursor(), key[0], key[1], floor)
            for key, floor in touched.items()
        }
        self.store.commit()
        self.stored += sum(kind != "status" for kind, _, _ in stored)
        for kind, device, body in stored:
            if self.view is not None:
                self.view.observe(kind, device, body)
            if self.echo is not None:
                self.echo(kind, device, body)
        for (device, boot_id), mseq in acks.items():
            self.client.publish(
                FleetTopics(self.s.prefix).device(device).ack,
                json.dumps({"boot_id": boot_id, "mseq": mseq}),
                qos=1,
            )

    def _store_all(
        self, batch: list[tuple[str, bytes]], isolate: bool
    ) -> tuple[dict[tuple[str, str], int], list[_Stored]]:
        cur = self.store.cursor()
        touched: dict[tuple[str, str], int] = {}
        stored: list[_Stored] = []
        for topic, payload in batch:
            parts = topic.split("/")
            if len(parts) < 3 or parts[-3] != "devices":
                continue
            device, kind = parts[-2], parts[-1]
            if not isolate:
                key = self._store_one(cur, device, kind, payload, stored)
            else:
                cur.execute("SAVEPOINT message")
                try:
                    key = self._store_one(cur, device, kind, payload, stored)
                except Exception as exc:  # noqa: BLE001 - one message never costs another
                    cur.execute("ROLLBACK TO SAVEPOINT message")
                    key = self._reject(cur, device, payload, exc)
                cur.execute("RELEASE SAVEPOINT message")
            if key is not None:
                touched[key[:2]] = max(touched.get(key[:2], 1), key[2])
        return touched, stored
