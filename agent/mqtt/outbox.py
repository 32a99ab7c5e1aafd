"""Every message between the link's queue and its acknowledgement, in memory or on disk.

A message is held in memory first and written to the spool (``mqtt.spool``, SQLite) only
when it is still unacknowledged ``flush_after_s`` after it was made: with the link up and the
broker (or the collector) acknowledging, a device writes almost nothing to its SD card. When
the oldest message held is due, everything held goes to disk in one transaction, so while the
link is down the disk sees one write per ``flush_after_s``. Rows acknowledged after they
reached the disk are deleted in the next such transaction (at the latest ``flush_after_s``
later): a kill before it sends them again, which the receiver recognises by boot id and seq.
A SIGKILL or a power cut loses at most the unacknowledged messages of the last
``flush_after_s`` (plus what SQLite's ``synchronous=NORMAL`` leaves to the OS); with
``flush_after_s = 0`` every message is written on the outbox's next turn (20 ms).

When the state directory cannot be written (disk full, read-only, I/O error) messages stay
in memory, up to ``memory_max_bytes``; beyond that the oldest are dropped and counted, and
the count reaches the spool when it can be written again. A graceful stop writes everything
held in memory. Which messages are on the wire is kept here in memory, never on disk.

Ids are shared by both tiers and ascend, so everything on disk is older than everything in
memory; a flush moves the oldest messages of memory, keeping that order.

Only one thread (the MQTT link's outbox thread) uses an Outbox.
"""

from __future__ import annotations

import collections
import dataclasses
import sqlite3
import time
from collections.abc import Callable, Iterable

import structlog

from edgefleet.mqtt.spool import Spool, Spooled

log = structlog.get_logger(__name__)

SQLITE_FULL = 13  # sqlite3.SQLITE_FULL from Python 3.11 on
RETRY_DISK_S = 1.0  # a state directory that failed is tried again this often
REPORT_DISK_EVERY_S = 60.0  # the error is logged again at most this often while it lasts


@dataclasses.dataclass
class DiskState:
    """Whether the spool can be written, and since when it cannot."""

    ok: bool = True
    full: bool = False
    error: str = ""
    since: float = 0.0  # monotonic time of the first failure of this spell
    failures: int = 0  # writes refused in this spell

    def as_dict(self, now: float) -> dict[str, object]:
        body: dict[str, object] = {"ok": self.ok, "full": self.full}
        if not self.ok:
            body["error"] = self.error
            body["for_s"] = round(now - self.since, 1)
        return body


def _is_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return bool(code == SQLITE_FULL)
    return "full" in str(exc).lower() or getattr(exc, "errno", None) == 28  # ENOSPC


class Outbox:
    """A FIFO of messages for the broker: memory first, the spool for those that wait."""

    def __init__(
        self,
        spool: Spool,
        boot_id: str,
        flush_after_s: float = 5.0,
        memory_max_bytes: int = 8 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
        on_disk_change: Callable[[DiskState], None] | None = None,
    ) -> None:
        self.spool = spool
        self.boot_id = boot_id
        self.flush_after_s = flush_after_s
        self.memory_max_bytes = memory_max_bytes
        self._clock = clock
        self._on_disk_change = on_disk_change
        self.disk = DiskState()
        self._retry_at = 0.0
        self._reported_at = 0.0
        self._memory: collections.OrderedDict[int, tuple[Spooled, float]] = (
            collections.OrderedDict()
        )
        self._memory_bytes = 0
        self._unsent: collections.deque[int] = collections.deque()  # ids in memory, in order
        self._sent: set[int] = set()  # handed to the broker on this connection, not acked
        self._tried: set[int] = set()  # handed to a broker at least once
        self._disk_next = 0  # disk rows below this id were handed out since the last requeue
        self._disk_rows = spool.depth()  # rows on disk not yet acknowledged
        # Acknowledged after they reached the disk, deleted by the next write: broker acks by
        # id, collector acks by the seq each boot is acknowledged up to.
        self._doomed: set[int] = set()
        self._acked_upto: dict[str, int] = {}
        self._doomed_since: float | None = None
        self._dropped_unwritten = 0  # dropped from memory, not yet counted in the spool
        self._next_id = spool.next_id()
        self._seq = spool.last_seq(boot_id)

    # -- what the link puts in ----------------------------------------------------------
    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def put_many(self, items: list[tuple[int, str, bytes, int]]) -> None:
        """Hold (seq, topic, payload, qos) messages; they reach the disk by ``flush``."""
        now_wall, now = time.time(), self._clock()
        for seq, topic, payload, qos in items:
            ident = self._next_id
            self._next_id += 1
            message = Spooled(ident, self.boot_id, seq, topic, payload, qos, 0, now_wall)
            self._memory[ident] = (message, now)
            self._unsent.append(ident)
            self._memory_bytes += len(payload)
        if self._memory_bytes > self.memory_max_bytes:
            self.flush()

    # -- memory -> disk ---------------------------------------------------------------
    def flush(self, everything: bool = False) -> None:
        """One disk write when something is due: every message held (once the oldest waited
        ``flush_after_s``, or memory is past its bound) and the deletes that waited."""
        now = self._clock()
        due = now - self.flush_after_s
        oldest = next(iter(self._memory.values()))[1] if self._memory else None
        write_memory = oldest is not None and (
            everything or oldest <= due or self._memory_bytes > self.memory_max_bytes
        )
        pending_deletes = bool(self._doomed or self._acked_upto)
        deletes_due = pending_deletes and (
            everything or write_memory or (self._doomed_since or now) <= due
        )
        if not (write_memory or deletes_due):
            return
        if not self.disk.ok and now < self._retry_at:
            self._bound_memory()
            return
        batch = [self._with_attempts(m) for m, _ in self._memory.values()] if write_memory else []
        doomed, acked = sorted(self._doomed), dict(self._acked_upto)
        if self._write(lambda: self.spool.commit(batch, doomed, acked)):
            if batch:
                self._moved_to_disk(batch)
            self._doomed.clear()
            self._acked_upto.clear()
            self._doomed_since = None
            self._disk_rows = self.spool.depth()
        self._bound_memory()

    def _moved_to_disk(self, batch: list[Spooled]) -> None:
        """The whole of memory is on disk now: its unsent messages are disk rows to send."""
        self._memory.clear()
        self._memory_bytes = 0
        if self._unsent:
            self._unsent.clear()
            self._disk_next = min(self._disk_next, batch[0].id)

    def _bound_memory(self) -> None:
        """Past the memory bound with a disk that cannot take them: the oldest go."""
        dropped = 0
        while self._memory_bytes > self.memory_max_bytes and self._memory:
            ident, (message, _) = self._memory.popitem(last=False)
            self._memory_bytes -= len(message.payload)
            self._sent.discard(ident)
            self._tried.discard(ident)
            dropped += 1
        if dropped:
            self._unsent = collections.deque(i for i in self._unsent if i in self._memory)
            self._dropped_unwritten += dropped
            log.warning(
                "outbox full in memory and the state directory refuses writes: oldest dropped",
                dropped=dropped,
                dropped_total=self._dropped_unwritten,
            )

    def _write(self, action: Callable[[], object]) -> bool:
        """Run a spool write; on failure note the disk's state, never raise."""
        try:
            action()
        except (sqlite3.Error, OSError) as exc:
            self._disk_failed(exc)
            return False
        if not self.disk.ok:
            self._disk_recovered()
        return True

    def _disk_failed(self, exc: BaseException) -> None:
        now = self._clock()
        self._retry_at = now + RETRY_DISK_S
        first = self.disk.ok
        if first:
            self.disk = DiskState(ok=False, full=_is_full(exc), error=str(exc), since=now)
        self.disk.failures += 1
        if first or now - self._reported_at >= REPORT_DISK_EVERY_S:
            self._reported_at = now
            log.error(
                "state directory full: messages held in memory"
                if self.disk.full
                else "state directory refuses writes: messages held in memory",
                path=str(self.spool.path),
                error=str(exc),
                held=len(self._memory),
                held_bytes=self._memory_bytes,
                memory_max_bytes=self.memory_max_bytes,
            )
        if first and self._on_disk_change is not None:
            self._on_disk_change(self.disk)

    def _disk_recovered(self) -> None:
        spell = self._clock() - self.disk.since
        log.warning(
            "state directory writable again",
            after_s=round(spell, 1),
            refused_writes=self.disk.failures,
            dropped=self._dropped_unwritten,
        )
        self.disk = DiskState()
        if self._dropped_unwritten and self._write(
            lambda: self.spool.count_dropped(self._dropped_unwritten)
        ):
            self._dropped_unwritten = 0
        if self._on_disk_change is not None:
            self._on_disk_change(self.disk)

    # -- out to the broker --------------------------------------------------------------
    def take(self, limit: int, busy: Iterable[int] = ()) -> list[Spooled]:
        """The oldest messages not on the wire, at most ``limit``; now counted as sent.

        ``busy`` are ids the link still has in flight (they count as sent).
        """
        busy_ids = set(busy)
        self._sent |= busy_ids
        out = self._take_from_disk(limit) if self._disk_rows else []
        while len(out) < limit and self._unsent:
            ident = self._unsent.popleft()
            held = self._memory.get(ident)
            if held is None or ident in self._sent:
                continue
            out.append(self._with_attempts(held[0]))
        for message in out:
            self._sent.add(message.id)
            self._tried.add(message.id)
        return out

    def _take_from_disk(self, limit: int) -> list[Spooled]:
        out: list[Spooled] = []
        cursor = self._disk_next
        while len(out) < limit:
            rows = self.spool.after(cursor, limit)
            if not rows:
                break
            for row in rows:
                cursor = row.id + 1
                if row.id in self._sent or self._is_acked(row):
                    continue
                out.append(self._with_attempts(row))
                if len(out) == limit:
                    break
        self._disk_next = cursor
        return out

    def _is_acked(self, row: Spooled) -> bool:
        """Acknowledged, waiting for the next write to be deleted."""
        return row.id in self._doomed or row.seq <= self._acked_upto.get(row.boot_id, 0)

    def _with_attempts(self, message: Spooled) -> Spooled:
        if message.id in self._tried and message.attempts == 0:
            return dataclasses.replace(message, attempts=1)
        return message

    def requeue_unacked(self, keep: set[int] | None = None) -> int:
        """Everything sent but not acknowledged goes out again (except ids in ``keep``)."""
        keep = keep or set()
        again = self._sent - keep
        self._sent &= keep
        in_memory = [i for i in again if i in self._memory]
        if in_memory:
            self._unsent = collections.deque(sorted({*self._unsent, *in_memory}))
        on_disk = [i for i in again if i not in self._memory]
        if on_disk or not keep:
            self._disk_next = min([self._disk_next, *on_disk]) if keep else 0
        return len(again)

    # -- acknowledgements ---------------------------------------------------------------
    def delete(self, ids: list[int]) -> None:
        """Broker acks: these messages are done with."""
        for ident in ids:
            self._sent.discard(ident)
            self._tried.discard(ident)
            held = self._memory.pop(ident, None)
            if held is not None:
                self._memory_bytes -= len(held[0].payload)
            elif self._disk_rows and ident not in self._doomed:
                self._doomed.add(ident)
                self._disk_rows -= 1
                self._doomed_since = self._doomed_since or self._clock()

    def ack_upto(self, boot_id: str, seq: int) -> int:
        """Collector ack: everything of ``boot_id`` up to ``seq`` is stored centrally."""
        gone = 0
        if boot_id == self.boot_id:
            while self._memory:
                ident, (message, _) = next(iter(self._memory.items()))
                if message.seq > seq:
                    break
                self._memory.popitem(last=False)
                self._memory_bytes -= len(message.payload)
                self._sent.discard(ident)
                self._tried.discard(ident)
                gone += 1
        before = self._acked_upto.get(boot_id, 0)
        if self._disk_rows and seq > before:
            on_disk = self.spool.count(boot_id, before, seq)
            if on_disk:
                self._acked_upto[boot_id] = seq
                self._disk_rows -= on_disk
                self._doomed_since = self._doomed_since or self._clock()
                gone += on_disk
        return gone

    # -- figures ------------------------------------------------------------------------
    def floor(self, boot_id: str) -> int:
        """Lowest seq of ``boot_id`` still held (everything below is acked or dropped)."""
        above = self._acked_upto.get(boot_id, 0)
        lowest = self.spool.floor(boot_id, above) if self._disk_rows else None
        if boot_id == self.boot_id and self._memory:
            first = next(iter(self._memory.values()))[0].seq
            lowest = first if lowest is None else min(lowest, first)
        return lowest if lowest is not None else self._seq + 1

    def depth(self) -> int:
        return len(self._memory) + self._disk_rows

    def bytes_of(self, topic: str) -> int:
        """Payload bytes held for one topic, in memory and on disk (one query: call it
        seldom, as the link does once a second for the kinds someone watches)."""
        held = sum(len(m.payload) for m, _ in self._memory.values() if m.topic == topic)
        return held + (self.spool.bytes_of(topic) if self._disk_rows else 0)

    @property
    def bytes(self) -> int:
        return self._memory_bytes + self.spool.bytes

    @property
    def in_memory(self) -> int:
        return len(self._memory)

    @property
    def dropped(self) -> int:
        return self.spool.dropped + self._dropped_unwritten

    def stats(self) -> dict[str, int]:
        """Counts only (older collectors read ``spool`` as a map of integers)."""
        return {
            "depth": self.depth(),
            "bytes": self.bytes,
            "dropped": self.dropped,
            "in_memory": self.in_memory,
            "on_disk": self._disk_rows,
        }

    def disk_state(self) -> dict[str, object]:
        return self.disk.as_dict(self._clock())

    def close(self) -> None:
        """Write what memory holds (a graceful stop loses nothing), then close the file."""
        self._retry_at = 0.0
        self.flush(everything=True)
        self.spool.close()
