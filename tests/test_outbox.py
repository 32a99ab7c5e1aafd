"""The outbox: memory first, the spool for what waits; order, acks, requeues, a full disk."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.mqtt import outbox as outbox_module
from edgefleet.mqtt.outbox import Outbox
from edgefleet.mqtt.spool import Spool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _outbox(path: Path, flush_after_s: float = 5.0, **kwargs: object) -> tuple[Outbox, Clock]:
    clock = Clock()
    box = Outbox(Spool(path), "boot-a", flush_after_s, clock=clock, **kwargs)  # type: ignore[arg-type]
    return box, clock


def _fill(box: Outbox, count: int, size: int = 100) -> list[int]:
    seqs = [box.next_seq() for _ in range(count)]
    box.put_many([(s, "t/x", b"{" + b" " * size + b"}", 1) for s in seqs])
    return seqs


@pytest.mark.parametrize("flush_after_s", [0.0, 5.0])
def test_fifo_send_ack_and_requeue_in_either_tier(tmp_path: Path, flush_after_s: float) -> None:
    box, _ = _outbox(tmp_path / "s.sqlite", flush_after_s)
    _fill(box, 5)
    box.flush()
    on_disk = box.spool.depth()
    assert on_disk == (5 if flush_after_s == 0 else 0)
    first = box.take(3)
    assert [m.seq for m in first] == [1, 2, 3]
    assert [m.seq for m in box.take(10)] == [4, 5]
    assert box.take(10) == []  # everything is on the wire
    box.delete([first[0].id, first[1].id])
    assert box.depth() == 3
    box.flush()
    assert box.spool.depth() == (3 if flush_after_s == 0 else 0)
    assert box.requeue_unacked() == 3
    again = box.take(10)
    assert [m.seq for m in again] == [3, 4, 5]
    assert all(m.attempts == 1 for m in again)


def test_a_message_reaches_the_disk_only_once_it_waited(tmp_path: Path) -> None:
    box, clock = _outbox(tmp_path / "s.sqlite", flush_after_s=5.0)
    _fill(box, 3)
    clock.now += 4.9
    box.flush()
    assert box.spool.depth() == 0  # acknowledged in time, it would never be written
    _fill(box, 2)
    clock.now += 0.1
    box.flush()
    # The oldest is due: everything held goes in that one write (the young ones too).
    assert [m.seq for m in box.spool.after(0, 10)] == [1, 2, 3, 4, 5]
    assert box.in_memory == 0
    _fill(box, 1)
    assert [m.seq for m in box.take(10)] == [1, 2, 3, 4, 5, 6]  # one order over both tiers


def test_what_is_in_flight_when_written_is_not_sent_twice(tmp_path: Path) -> None:
    box, clock = _outbox(tmp_path / "s.sqlite", flush_after_s=5.0)
    _fill(box, 4)
    sent = box.take(2)
    clock.now += 5
    box.flush()
    assert box.spool.depth() == 4
    assert [m.seq for m in box.take(10)] == [3, 4]
    box.delete([m.id for m in sent])  # the PUBACKs of the first two, after they were written
    assert box.depth() == 2
    box.flush(everything=True)
    assert [m.seq for m in box.spool.after(0, 10)] == [3, 4]


def test_unsent_messages_written_to_disk_are_still_sent(tmp_path: Path) -> None:
    """Written while the link was down: they go out from the disk when it comes back."""
    box, clock = _outbox(tmp_path / "s.sqlite", flush_after_s=5.0)
    _fill(box, 2)
    assert [m.seq for m in box.take(10)] == [1, 2]
    assert box.requeue_unacked() == 2  # the link dropped before their PUBACKs
    _fill(box, 2)
    clock.now += 5
    box.flush()
    _fill(box, 1)
    assert [m.seq for m in box.take(10)] == [1, 2, 3, 4, 5]


def test_rows_acknowledged_on_disk_go_with_the_next_write_and_never_out_again(
    tmp_path: Path,
) -> None:
    """A backlog replayed after an outage: its acks cost one write per flush_after_s, not one
    per ack; until then the rows stay on disk but are never sent again."""
    path = tmp_path / "s.sqlite"
    box, clock = _outbox(path, flush_after_s=5.0)
    _fill(box, 6)
    clock.now += 5
    box.flush()  # the link was down: on disk
    backlog = box.take(10)
    box.delete([m.id for m in backlog[:4]])
    box.ack_upto("other-boot", 10)  # nothing of it here: nothing to do
    assert box.depth() == 2
    assert box.requeue_unacked() == 2  # a reconnect: only the unacknowledged go again
    assert [m.seq for m in box.take(10)] == [5, 6]
    clock.now += 4.9
    box.flush()
    assert box.spool.depth() == 6  # not yet
    clock.now += 0.1
    box.flush()
    assert [m.seq for m in box.spool.after(0, 10)] == [5, 6]


def test_a_kill_before_the_deletes_sends_those_rows_again(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    box, clock = _outbox(path, flush_after_s=5.0)
    _fill(box, 3)
    clock.now += 5
    box.flush()
    box.delete([m.id for m in box.take(10)])
    del box  # killed before the next write: acknowledged rows come back (duplicates)
    again = Outbox(Spool(path), "boot-b", 5.0)
    assert [(m.boot_id, m.seq) for m in again.take(10)] == [("boot-a", s) for s in (1, 2, 3)]


def test_busy_ids_are_not_taken_and_the_limit_holds(tmp_path: Path) -> None:
    box, _ = _outbox(tmp_path / "s.sqlite", flush_after_s=0.0)
    _fill(box, 6)
    box.flush()
    everything = box.take(10)
    ids = [m.id for m in everything]
    box.requeue_unacked()
    got = box.take(2, busy={ids[0], ids[1]})
    assert [m.id for m in got] == ids[2:4]
    assert len(box.take(4)) == 2  # what is left


def test_requeue_keeps_what_is_still_in_flight(tmp_path: Path) -> None:
    """Collector mode: resend what no collector confirmed, but not what is on the wire."""
    box, clock = _outbox(tmp_path / "s.sqlite", flush_after_s=5.0)
    _fill(box, 2)
    clock.now += 5
    box.flush()
    _fill(box, 2)  # two on disk, two in memory
    ids = [m.id for m in box.take(10)]
    assert box.take(10) == []
    assert box.requeue_unacked(keep={ids[1], ids[2]}) == 2
    assert [m.id for m in box.take(10)] == [ids[0], ids[3]]


def test_collector_ack_and_floor_across_both_tiers(tmp_path: Path) -> None:
    box, clock = _outbox(tmp_path / "s.sqlite", flush_after_s=5.0)
    _fill(box, 4)
    clock.now += 5
    box.flush()
    _fill(box, 4)
    assert box.floor("boot-a") == 1
    assert box.ack_upto("boot-a", 6) == 6
    assert box.floor("boot-a") == 7
    assert box.depth() == 2
    assert box.spool.depth() == 4  # deleted with the next write
    clock.now += 5
    box.flush()  # the acknowledged rows go, the two still held in memory come
    assert [m.seq for m in box.spool.after(0, 10)] == [7, 8]
    assert box.ack_upto("other-boot", 100) == 0
    assert box.ack_upto("boot-a", 8) == 2
    assert box.floor("boot-a") == 9  # nothing held: the next seq


def test_a_stop_writes_everything_a_kill_loses_only_the_young(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    box, clock = _outbox(path, flush_after_s=5.0)
    _fill(box, 3)
    clock.now += 5
    box.flush()
    _fill(box, 2)
    del box  # a SIGKILL: the last two were younger than flush_after_s
    killed = Spool(path)
    assert [m.seq for m in killed.after(0, 10)] == [1, 2, 3]
    killed.close()
    box, _ = _outbox(path, flush_after_s=5.0)
    _fill(box, 2)
    box.close()  # a graceful stop
    assert [m.seq for m in Spool(path).after(0, 10)] == [1, 2, 3, 4, 5]  # the boot goes on


def test_past_its_memory_bound_the_outbox_writes_at_once(tmp_path: Path) -> None:
    box, _ = _outbox(tmp_path / "s.sqlite", flush_after_s=60.0, memory_max_bytes=64 * 1024)
    _fill(box, 1000, size=298)  # 300 kB, far younger than a minute
    assert box.bytes == 300_000
    assert box.in_memory * 300 <= 64 * 1024
    assert box.spool.depth() + box.in_memory == 1000
    assert box.dropped == 0


def test_ids_keep_ascending_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    box, _ = _outbox(path, flush_after_s=0.0)
    _fill(box, 3)
    box.flush()
    ids = [m.id for m in box.take(10)]
    box.delete(ids)
    box.close()
    again, _ = _outbox(path, flush_after_s=0.0)
    _fill(again, 1)
    assert again.take(1)[0].id > max(ids)


# -- a state directory that is full: a real tmpfs, filled -------------------------------------
@contextlib.contextmanager
def _small_tmpfs(where: Path, size: str = "1m") -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill_disk(folder: Path) -> Path:
    """Write a file until the file system says it is full; the file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_holds_in_memory_drops_past_the_bound_and_recovers(
    tmp_path: Path,
) -> None:
    with _small_tmpfs(tmp_path / "state") as state:
        changes: list[bool] = []
        box, clock = _outbox(
            state / "s.sqlite",
            flush_after_s=0.0,
            memory_max_bytes=64 * 1024,
            on_disk_change=lambda disk: changes.append(disk.ok),
        )
        _fill(box, 10)
        box.flush()
        assert box.spool.depth() == 10
        filler = _fill_disk(state)
        _fill(box, 100, size=298)  # 30 kB that cannot be written
        box.flush()
        assert not box.disk.ok
        assert box.disk.full
        assert changes == [False]
        # Held in memory: sent and acknowledged as if nothing had happened.
        taken = box.take(1000)
        assert [m.seq for m in taken] == list(range(1, 111))
        box.delete([m.id for m in taken[10:20]])
        assert box.depth() == 100
        # Past the memory bound the oldest of memory go, counted.
        _fill(box, 200, size=298)
        clock.now += outbox_module.RETRY_DISK_S
        box.flush()
        assert box.dropped > 0
        assert box.in_memory * 300 <= 64 * 1024
        dropped = box.dropped
        # Space again: everything held reaches the disk, the count too.
        filler.unlink()
        clock.now += outbox_module.RETRY_DISK_S
        box.flush()
        assert box.disk_state() == {"ok": True, "full": False}
        assert changes == [False, True]
        assert box.in_memory == 0
        assert box.spool.dropped == dropped
        assert box.depth() == 10 + 290 - dropped
        box.close()
        check = sqlite3.connect(state / "s.sqlite").execute("PRAGMA integrity_check").fetchone()
        assert check[0] == "ok"
