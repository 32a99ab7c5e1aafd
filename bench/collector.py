"""The collector's acknowledgement step on PostgreSQL, old and new side by side (prints).

    .venv/bin/python bench/collector.py [--pg URL] [--boots 300] [--rounds 6]

``Store.advance`` finds how far a boot's stored messages are contiguous. It used to ask for
the next number one query at a time; it now reads a page of numbers per query. Each round
stores one new message for each of ``--boots`` boots (the common case: a batch touches a
device once) and times one advance per boot with each way, in alternating order.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from typing import Any

from edgefleet.collector.store import Store

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def advance_one_by_one(store: Store, cur: Any, device: str, boot_id: str, floor: int) -> int:
    """The former ``Store.advance``: one query per stored number."""
    cur.execute(store._q("SELECT mseq FROM acks WHERE boot_id = ?"), (boot_id,))
    row = cur.fetchone()
    contiguous = max(int(row[0]) if row else 0, floor - 1)
    while True:
        cur.execute(
            store._q("SELECT 1 FROM messages WHERE boot_id = ? AND mseq = ?"),
            (boot_id, contiguous + 1),
        )
        if cur.fetchone() is None:
            break
        contiguous += 1
    cur.execute(
        store._q(
            "INSERT INTO acks(boot_id, device, mseq) VALUES (?,?,?) "
            "ON CONFLICT(boot_id) DO UPDATE SET mseq=excluded.mseq"
        ),
        (boot_id, device, contiguous),
    )
    return contiguous


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", default=DEFAULT_PG)
    parser.add_argument("--boots", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    store = Store(args.pg)
    timings: dict[str, list[float]] = {"one by one": [], "paged": []}
    for round_ in range(args.rounds):
        order = list(timings) if round_ % 2 == 0 else list(reversed(timings))
        for name in order:
            cur = store.cursor()
            boots = [uuid.uuid4().hex for _ in range(args.boots)]
            for boot in boots:
                body = {"device": "d", "boot_id": boot, "mseq": 1, "floor": 1, "ts": 0.0}
                store.save_message(cur, "metrics", "d", body)
            store.commit()
            started = time.perf_counter()
            for boot in boots:
                if name == "paged":
                    store.advance(cur, "d", boot, 1)
                else:
                    advance_one_by_one(store, cur, "d", boot, 1)
            store.commit()
            timings[name].append((time.perf_counter() - started) / args.boots * 1000)
    for name, values in timings.items():
        rounded = ", ".join(f"{v:.3f}" for v in values)
        print(f"{name}: median {statistics.median(values):.3f} ms per advance ({rounded})")
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
