"""The outbox's disk tier: order, bounds, restart, damage."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from edgefleet.mqtt.spool import Spool, Spooled


def _fill(spool: Spool, count: int, size: int = 100, boot: str = "boot-a") -> list[int]:
    """``count`` rows of ``size`` + 2 bytes with the next ids and seqs; their seqs."""
    first_id, first_seq = spool.next_id(), spool.last_seq(boot) + 1
    seqs = list(range(first_seq, first_seq + count))
    spool.put_many(
        [
            Spooled(first_id + i, boot, seq, "t/x", b"{" + b" " * size + b"}", 1, 0, time.time())
            for i, seq in enumerate(seqs)
        ]
    )
    return seqs


def _seqs(spool: Spool) -> list[int]:
    return [m.seq for m in spool.after(0, 100_000)]


def test_rows_come_back_in_order_and_acks_remove_them(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite")
    _fill(spool, 5)
    rows = spool.after(0, 3)
    assert [m.seq for m in rows] == [1, 2, 3]
    assert [m.seq for m in spool.after(rows[-1].id + 1, 10)] == [4, 5]
    spool.delete([rows[0].id, rows[1].id])
    assert spool.depth() == 3
    assert _seqs(spool) == [3, 4, 5]


def test_collector_ack_and_floor(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite")
    _fill(spool, 10)
    assert spool.floor("boot-a") == 1
    assert spool.ack_upto("boot-a", 4) == 4
    assert spool.floor("boot-a") == 5
    assert spool.ack_upto("other-boot", 100) == 0
    assert spool.floor("other-boot") is None
    assert spool.depth() == 6


def test_survives_restart_and_keeps_other_boots(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    spool = Spool(path)
    _fill(spool, 7)
    del spool  # no close: like a SIGKILL
    again = Spool(path)
    assert [(m.boot_id, m.seq) for m in again.after(0, 100)] == [("boot-a", s) for s in range(1, 8)]
    assert again.last_seq("boot-b") == 0  # a new boot counts from 1
    assert again.last_seq("boot-a") == 7  # the same boot would continue


def test_ids_are_never_reused(tmp_path: Path) -> None:
    """The outbox's ids order both tiers: an id once used (and deleted) never comes back."""
    path = tmp_path / "s.sqlite"
    spool = Spool(path)
    _fill(spool, 3)
    top = spool.next_id()
    spool.delete([m.id for m in spool.after(0, 10)])
    assert spool.depth() == 0
    spool.close()
    assert Spool(path).next_id() == top


def test_bytes_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_bytes=64 * 1024)
    _fill(spool, 1000, size=300)
    assert spool.bytes <= 64 * 1024
    assert spool.dropped > 0
    remaining = _seqs(spool)
    assert remaining == list(range(1001 - len(remaining), 1001))  # the newest survive
    assert spool.floor("boot-a") == remaining[0]
    assert spool.dropped + len(remaining) == 1000


def test_age_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_age_s=0.2)
    _fill(spool, 3)
    time.sleep(0.3)
    _fill(spool, 2)
    assert _seqs(spool) == [4, 5]
    assert spool.dropped == 3


def test_damaged_file_is_moved_aside_not_deleted(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"garbage" * 1000)
    spool = Spool(path)
    assert spool.moved_aside is not None
    assert spool.moved_aside.read_bytes().startswith(b"garbage")
    _fill(spool, 2)
    assert spool.depth() == 2
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- the survivors of tools/mutate.py: each limit at its edge, each failure path -------------
def test_settings_that_make_it_durable(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "deep" / "er" / "s.sqlite")  # folders made
    assert spool.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert spool.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert spool.dropped == 0
    assert spool.floor("boot-a") is None  # nothing held
    spool.close()
    with pytest.raises(sqlite3.ProgrammingError):
        spool.depth()


def test_a_spool_that_opens_but_fails_its_check_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    spool = Spool(path)
    _fill(spool, 400, size=200)
    spool.close()
    probe = sqlite3.connect(path)
    size = probe.execute("PRAGMA page_size").fetchone()[0]
    leaves = [
        row[0]
        for row in probe.execute(
            "SELECT pageno FROM dbstat WHERE name = 'outbox' AND pagetype = 'leaf' ORDER BY pageno"
        )
    ]
    probe.close()
    # Damage one leaf of the table (the start of its cell content area, in the page header):
    # its covering index still answers count(*), so the file opens and reads; only
    # quick_check finds the damage ("free space corruption"), and says so in a row.
    data = bytearray(path.read_bytes())
    start = (leaves[-1] - 1) * size + 5
    data[start : start + 2] = b"\xff\xff"
    path.write_bytes(bytes(data))
    (tmp_path / "s.sqlite-wal").write_bytes(b"")  # a side file goes along with it
    check = sqlite3.connect(path).execute("PRAGMA quick_check").fetchone()[0]
    assert check != "ok"  # it opens; only the check finds the damage
    again = Spool(path)
    assert again.moved_aside is not None
    assert again.moved_aside.read_bytes() == bytes(data)  # kept as it was
    assert Path(f"{again.moved_aside}-wal").exists()
    assert again.depth() == 0
    _fill(again, 2)
    assert again.depth() == 2


def test_a_failing_write_commits_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite")
    _fill(spool, 2)
    before = spool.bytes
    now = time.time()
    bad = [
        Spooled(10, "boot-a", 3, "t/x", b"{}", 1, 0, now),
        Spooled(11, "boot-a", 4, "t/x", None, 1, 0, now),  # type: ignore[arg-type]
    ]  # the second violates NOT NULL
    with pytest.raises(sqlite3.IntegrityError):
        spool.put_many(bad)
    assert _seqs(spool) == [1, 2]  # not half of the batch
    assert spool.bytes == before
    _fill(spool, 1)  # and the spool still works
    assert spool.depth() == 3


def test_the_bytes_bound_at_its_edge(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_bytes=1020)
    _fill(spool, 10, size=100)  # 10 x 102 bytes: exactly the bound
    assert spool.bytes == 1020
    assert spool.dropped == 0
    _fill(spool, 1, size=0)  # 2 more bytes: over it, the oldest go
    assert spool.dropped > 0
    assert spool.bytes <= 1020


def test_the_age_bound_at_its_edge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("edgefleet.mqtt.spool.time.time", lambda: now[0])
    spool = Spool(tmp_path / "s.sqlite", max_age_s=10)
    _fill(spool, 2)
    now[0] = 1010.0  # exactly max_age_s old: still kept
    _fill(spool, 1)
    assert spool.dropped == 0
    now[0] = 1010.001
    _fill(spool, 1)
    assert spool.dropped == 2
    assert _seqs(spool) == [3, 4]


def test_spooled_messages_are_immutable(tmp_path: Path) -> None:
    import dataclasses

    spool = Spool(tmp_path / "s.sqlite")
    _fill(spool, 1)
    message = spool.after(0, 1)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.seq = 5  # type: ignore[misc]
