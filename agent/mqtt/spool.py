"""The on-disk outbox: every message is written here before it is published.

SQLite in WAL mode, one file under the state directory. A message is deleted only when it
is acknowledged (PUBACK in ``broker`` mode, the collector's ack in ``collector`` mode), so a
broker outage, a network outage or an agent SIGKILL loses nothing that reached the spool.
Bounded by bytes and age: when full the oldest messages are dropped and counted.

Every message of a boot has a contiguous ``seq`` (per boot id); published payloads carry
``boot_id``, ``seq`` and ``floor`` (the lowest seq of that boot still held here), so a
collector can ack "everything up to N" even across messages the spool had to drop.

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
    """One message waiting for its acknowledgement."""

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
        boot_id: str,
        max_bytes: int = 64 * 1024 * 1024,
        max_age_s: float = 7 * 24 * 3600,
    ) -> None:
        self.path = path
        self.boot_id = boot_id
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.moved_aside: Path | None = None
        self.db = self._open()
        self._seq = self._last_seq()
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

    def _last_seq(self) -> int:
        row = self.db.execute(
            "SELECT max(seq) FROM outbox WHERE boot_id = ?", (self.boot_id,)
        ).fetchone()
        return int(row[0] or 0)

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

    # -- the queue ----------------------------------------------------------------------
    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def put_many(self, items: list[tuple[int, str, bytes, int]]) -> None:
        """Store (seq, topic, payload, qos) messages in one transaction, then enforce bounds."""
        if not items:
            return
        now = time.time()
        with self._transaction():
            self.db.executemany(
                "INSERT INTO outbox(boot_id, seq, topic, payload, qos, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (self.boot_id, seq, topic, payload, qos, now)
                    for seq, topic, payload, qos in items
                ],
            )
            self._bytes += sum(len(p) for _, _, p, _ in items)
            self._enforce_bounds(now)

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

    def pending(self, limit: int, exclude_ids: set[int] | None = None) -> list[Spooled]:
        """The oldest messages not yet handed to the broker in this session."""
        rows = self.db.execute(
            "SELECT id, boot_id, seq, topic, payload, qos, attempts, created FROM outbox "
            "WHERE sent = 0 ORDER BY id LIMIT ?",
            (limit + len(exclude_ids or ()),),
        ).fetchall()
        out = [Spooled(*row) for row in rows if not exclude_ids or row[0] not in exclude_ids]
        return out[:limit]

    def mark_sent(self, ids: list[int]) -> None:
        if ids:
            with self._transaction():  # one commit for the window, not one per message
                self.db.executemany(
                    "UPDATE outbox SET sent = 1, attempts = attempts + 1 WHERE id = ?",
                    [(i,) for i in ids],
                )

    def requeue_unacked(self, keep: set[int] | None = None) -> int:
        """Everything sent but not acknowledged goes out again (except ids in ``keep``)."""
        if not keep:
            return self.db.execute("UPDATE outbox SET sent = 0 WHERE sent = 1").rowcount
        with self._transaction():
            rows = self.db.execute("SELECT id FROM outbox WHERE sent = 1").fetchall()
            ids = [(r[0],) for r in rows if r[0] not in keep]
            self.db.executemany("UPDATE outbox SET sent = 0 WHERE id = ?", ids)
        return len(ids)

    def delete(self, ids: list[int]) -> None:
        if not ids:
            return
        with self._transaction():
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                gone = self.db.execute(
                    f"DELETE FROM outbox WHERE id IN ({marks}) RETURNING length(payload)",  # noqa: S608
                    chunk,
                ).fetchall()
                self._bytes -= sum(r[0] for r in gone)

    def ack_upto(self, boot_id: str, seq: int) -> int:
        """Collector ack: everything of ``boot_id`` up to ``seq`` is stored centrally."""
        with self._transaction():
            gone = self.db.execute(
                "DELETE FROM outbox WHERE boot_id = ? AND seq <= ? RETURNING length(payload)",
                (boot_id, seq),
            ).fetchall()
            self._bytes -= sum(r[0] for r in gone)
        return len(gone)

    def floor(self, boot_id: str) -> int:
        """Lowest seq of ``boot_id`` still held (everything below is acked or dropped)."""
        row = self.db.execute(
            "SELECT min(seq) FROM outbox WHERE boot_id = ?", (boot_id,)
        ).fetchone()
        return int(row[0]) if row[0] is not None else self._seq + 1

    def depth(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM outbox").fetchone()[0])

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
