"""The on-disk spool: order, acks, bounds, restart, damage."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from edgefleet.mqtt.spool import Spool


def _fill(spool: Spool, count: int, size: int = 100) -> list[int]:
    seqs = [spool.next_seq() for _ in range(count)]
    spool.put_many([(s, "t/x", b"{" + b" " * size + b"}", 1) for s in seqs])
    return seqs


def test_fifo_send_and_broker_ack(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", "boot-a")
    _fill(spool, 5)
    first = spool.pending(3)
    assert [m.seq for m in first] == [1, 2, 3]
    spool.mark_sent([m.id for m in first])
    assert [m.seq for m in spool.pending(10)] == [4, 5]
    spool.delete([first[0].id, first[1].id])
    assert spool.depth() == 3
    assert spool.requeue_unacked() == 1
    assert [m.seq for m in spool.pending(10)] == [3, 4, 5]
    assert spool.pending(10)[0].attempts == 1


def test_collector_ack_and_floor(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", "boot-a")
    _fill(spool, 10)
    assert spool.floor("boot-a") == 1
    assert spool.ack_upto("boot-a", 4) == 4
    assert spool.floor("boot-a") == 5
    assert spool.ack_upto("other-boot", 100) == 0
    assert spool.depth() == 6


def test_survives_restart_and_keeps_other_boots(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    spool = Spool(path, "boot-a")
    _fill(spool, 7)
    del spool  # no close: like a SIGKILL
    again = Spool(path, "boot-b")
    rows = again.pending(100)
    assert [(m.boot_id, m.seq) for m in rows] == [("boot-a", s) for s in range(1, 8)]
    assert again.next_seq() == 1  # a new boot counts from 1
    resumed = Spool(path, "boot-a")
    assert resumed.next_seq() == 8  # the same boot would continue


def test_bytes_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", "boot-a", max_bytes=64 * 1024)
    _fill(spool, 1000, size=300)
    assert spool.bytes <= 64 * 1024
    assert spool.dropped > 0
    remaining = [m.seq for m in spool.pending(10_000)]
    assert remaining == list(range(1001 - len(remaining), 1001))  # the newest survive
    assert spool.floor("boot-a") == remaining[0]
    assert spool.dropped + len(remaining) == 1000


def test_age_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", "boot-a", max_age_s=0.2)
    _fill(spool, 3)
    time.sleep(0.3)
    _fill(spool, 2)
    assert [m.seq for m in spool.pending(10)] == [4, 5]
    assert spool.dropped == 3


def test_damaged_file_is_moved_aside_not_deleted(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"garbage" * 1000)
    spool = Spool(path, "boot-a")
    assert spool.moved_aside is not None
    assert spool.moved_aside.read_bytes().startswith(b"garbage")
    _fill(spool, 2)
    assert spool.depth() == 2
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
