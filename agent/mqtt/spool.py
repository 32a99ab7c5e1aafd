"""The outbox's disk tier: messages that waited too long for their acknowledgement.

SQLite in WAL mode, one file under the state directory. The outbox (``mqtt.outbox``) keeps
messages in memory first and writes here only what is still unacknowledged after
``fleet.spool.flush_after_s`` (or everything at once, with 0), so that a device whose link
is up writes almost nothing to its SD card. A row is deleted when acknowledged (PUBACK in
``broker`` mode, the collector's ack in ``collector`` mode), so a broker outage, a network
outage or an agent SIGKILL loses nothing that reached this file. Bounded by bytes and age:
when full the oldest rows are dropped and counted.

Rows carry the ids the outbox gave them (ascending, never reused: AUTOINCREMENT keeps its
high-water mark) and the ``seq`` of their boot. Which rows are on the wire is the outbox's
business, kept in memory: nothing here is written per publish.

Only one thread (the MQTT link's outbox thread) uses a Spool object.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    boot_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    sent INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_boot_seq ON outbox (boot_id, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Spooled:
    """One message waiting for its acknowledgement (in memory or on disk)."""

    id: int
    boot_id: str
    seq: int
    topic: str
    payload: bytes
    qos: int
    attempts: int
    created: float


class Spool:
    """A bounded, crash-safe FIFO of MQTT messages."""

    def __init__(
        self,
        path: Path,
        max_bytes: int = 64 * 1024 * 1024,
        max_age_s: float = 7 * 24 * 3600,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.moved_aside: Path | None = None
        self.db = self._open()
        self._bytes = self._total_bytes()

    # -- opening, and surviving a damaged file ------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL: a committed message survives a process crash; power loss may
        # lose the last moments, which is the trade every embedded queue makes on SD cards.
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        db.execute("SELECT count(*) FROM outbox").fetchone()
        return db

    def _checked(self) -> sqlite3.Connection:
        db = self._connect()
        check = db.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            db.close()
            raise sqlite3.DatabaseError(f"quick_check: {check}")
        return db

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._checked()
        except sqlite3.DatabaseError as exc:
            self.moved_aside = self._move_aside(str(exc))
        return self._connect()

    def _move_aside(self, reason: str) -> Path:
        # Never delete a damaged spool: it may hold the only copy of results.
        target = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        self.path.replace(target)
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                side.replace(target.with_name(target.name + suffix))
        log.error("spool damaged, moved aside; starting a new one", path=str(target), reason=reason)
        return target

    def _total_bytes(self) -> int:
        row = self.db.execute("SELECT coalesce(sum(length(payload)), 0) FROM outbox").fetchone()
        return int(row[0])

    # -- counters kept across restarts --------------------------------------------------
    def _bump(self, key: str, by: int) -> None:
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            (key, by),
        )

    def counter(self, key: str) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    @property
    def dropped(self) -> int:
        return self.counter("dropped")

    # -- the rows -------------------------------------------------------------------------
    def last_seq(self, boot_id: str) -> int:
        """The highest seq ``boot_id`` has here (0: none)."""
        row = self.db.execute(
            "SELECT max(seq) FROM outbox WHERE boot_id = ?", (boot_id,)
        ).fetchone()
        return int(row[0] or 0)

    def next_id(self) -> int:
        """An id above every id this file has held, deleted ones included."""
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        top = self.db.execute("SELECT max(id) FROM outbox").fetchone()
        return max(int(row[0]) if row else 0, int(top[0] or 0)) + 1

    def put_many(self, items: list[Spooled]) -> None:
        """Store messages (with their ids) in one transaction, then enforce the bounds."""
        self.commit(items)

    def commit(
        self,
        put: list[Spooled],
        delete_ids: list[int] | None = None,
        acks: dict[str, int] | None = None,
    ) -> None:
        """One transaction: store ``put``, delete ``delete_ids`` and, per boot id, every row
        up to its acknowledged seq (``acks``); then enforce the bounds. All or nothing."""
        if not put and not delete_ids and not acks:
            return
        with self._transaction():
            if put:
                self.db.executemany(
                    "INSERT INTO outbox(id, boot_id, seq, topic, payload, qos, created, attempts) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (m.id, m.boot_id, m.seq, m.topic, m.payload, m.qos, m.created, m.attempts)
                        for m in put
                    ],
                )
                self._bytes += sum(len(m.payload) for m in put)
            gone = self._delete_ids(delete_ids or [])
            for boot_id, seq in (acks or {}).items():
                gone += self.db.execute(
                    "DELETE FROM outbox WHERE boot_id = ? AND seq <= ? RETURNING length(payload)",
                    (boot_id, seq),
                ).fetchall()
            self._bytes -= sum(r[0] for r in gone)
            if put:
                self._enforce_bounds(time.time())

    def _delete_ids(self, ids: list[int]) -> list[Any]:
        gone: list[Any] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            gone += self.db.execute(
                f"DELETE FROM outbox WHERE id IN ({marks}) RETURNING length(payload)",  # noqa: S608
                chunk,
            ).fetchall()
        return gone

    def _enforce_bounds(self, now: float) -> None:
        dropped: list[Any] = []
        oldest = self.db.execute("SELECT created FROM outbox ORDER BY id LIMIT 1").fetchone()
        if oldest is not None and oldest[0] < now - self.max_age_s:
            # Rows are created in id order, so the expired ones are a prefix of the table.
            dropped = self.db.execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE created < ? "
                "ORDER BY id) RETURNING length(payload)",
                (now - self.max_age_s,),
            ).fetchall()
        while self._bytes - sum(r[0] for r in dropped) > self.max_bytes:
            oldest = self.db.execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT 64) "
                "RETURNING length(payload)"
            ).fetchall()
            if not oldest:
                break
            dropped.extend(oldest)
        if dropped:
            self._bytes -= sum(r[0] for r in dropped)
            self._bump("dropped", len(dropped))

    def count_dropped(self, count: int) -> None:
        """Messages the outbox had to drop before they reached this file."""
        if count:
            with self._transaction():
                self._bump("dropped", count)

    def after(self, first_id: int, limit: int) -> list[Spooled]:
        """Up to ``limit`` rows with ids from ``first_id`` on, oldest first."""
        rows = self.db.execute(
            "SELECT id, boot_id, seq, topic, payload, qos, attempts, created FROM outbox "
            "WHERE id >= ? ORDER BY id LIMIT ?",
            (first_id, limit),
        ).fetchall()
        return [Spooled(*row) for row in rows]

    def delete(self, ids: list[int]) -> None:
        self.commit([], delete_ids=ids)

    def ack_upto(self, boot_id: str, seq: int) -> int:
        """Collector ack: everything of ``boot_id`` up to ``seq`` is stored centrally."""
        before = self.depth()
        self.commit([], acks={boot_id: seq})
        return before - self.depth()

    def floor(self, boot_id: str, above: int = 0) -> int | None:
        """Lowest seq of ``boot_id`` above ``above`` still held here, or None."""
        row = self.db.execute(
            "SELECT min(seq) FROM outbox WHERE boot_id = ? AND seq > ?", (boot_id, above)
        ).fetchone()
        return int(row[0]) if row[0] is not None else None

    def count(self, boot_id: str, above: int, upto: int) -> int:
        """How many rows of ``boot_id`` have a seq in (above, upto]."""
        row = self.db.execute(
            "SELECT count(*) FROM outbox WHERE boot_id = ? AND seq > ? AND seq <= ?",
            (boot_id, above, upto),
        ).fetchone()
        return int(row[0])

    def depth(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def bytes_of(self, topic: str) -> int:
        """Payload bytes of the rows on one topic (acknowledged ones awaiting deletion too)."""
        row = self.db.execute(
            "SELECT coalesce(sum(length(payload)), 0) FROM outbox WHERE topic = ?", (topic,)
        ).fetchone()
        return int(row[0])

    @property
    def bytes(self) -> int:
        return self._bytes

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.close()
