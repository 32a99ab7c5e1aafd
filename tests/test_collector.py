"""The collector's store: idempotent, contiguous acks with floors, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.collector.collector import Collector, CollectorSettings
from edgefleet.collector.store import Store
from edgefleet.errors import UserError

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _pg_available() -> bool:
    try:
        Store(PG_URL).close()
    except UserError:
        return False
    return True


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    else:
        if not _pg_available():
            pytest.skip("no PostgreSQL on 127.0.0.1:5432")
        s = Store(PG_URL)
    yield s
    s.close()


def _message(boot: str, mseq: int, floor: int, seqs: list[int]) -> dict[str, object]:
    return {
        "device": "d1",
        "boot_id": boot,
        "mseq": mseq,
        "floor": floor,
        "ts": 1.0,
        "results": [
            {
                "seq": s,
                "boot_id": boot,
                "ts": 1.0,
                "model": "m",
                "model_version": 0,
                "top": [{"label": "cat", "index": 1, "score": 0.5}],
            }
            for s in seqs
        ],
    }


def test_idempotent_and_contiguous(store: Store) -> None:
    boot = uuid.uuid4().hex  # PostgreSQL is shared across runs: a fresh boot id each time
    cur = store.cursor()
    for mseq in (1, 2, 4):
        store.save_message(cur, "predictions", "d1", _message(boot, mseq, 1, [mseq]))
    store.save_message(cur, "predictions", "d1", _message(boot, 2, 1, [2]))  # a duplicate
    assert store.advance(cur, "d1", boot, 1) == 2  # 3 is missing
    store.commit()
    store.save_message(cur, "predictions", "d1", _message(boot, 3, 1, [3]))
    assert store.advance(cur, "d1", boot, 1) == 4
    # The device dropped 5..9 (spool full) and says so with its floor: no stall.
    store.save_message(cur, "predictions", "d1", _message(boot, 10, 10, [10]))
    assert store.advance(cur, "d1", boot, 10) == 10
    store.commit()
    cur.execute(store._q("SELECT count(*) FROM predictions WHERE boot_id = ?"), (boot,))
    assert cur.fetchone()[0] == 5


@pytest.mark.parametrize("page", [1, 3, 500])
def test_contiguous_run_found_across_pages(
    store: Store, page: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgefleet.collector import store as store_module

    monkeypatch.setattr(store_module, "ADVANCE_PAGE", page)
    boot = uuid.uuid4().hex
    cur = store.cursor()
    for mseq in [*range(1, 10), 11, 12]:  # 10 is missing; 9 is a whole number of pages of 3
        store.save_message(cur, "predictions", "d1", _message(boot, mseq, 1, [mseq]))
    assert store.advance(cur, "d1", boot, 1) == 9
    store.save_message(cur, "predictions", "d1", _message(boot, 10, 1, [10]))
    assert store.advance(cur, "d1", boot, 1) == 12
    store.commit()


def test_bad_database_urls(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="use sqlite:///PATH or postgresql://"):
        Store("mysql://x")
    with pytest.raises(UserError, match="cannot connect"):
        Store("postgresql://nobody@127.0.0.1:1/none")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_one_poisoned_message_never_costs_another(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deep nesting, NaN, absurd numbers and broken results are rejected one by one."""
    if backend == "postgresql" and not _pg_available():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    url = PG_URL if backend == "postgresql" else f"sqlite:///{tmp_path / 'fleet.db'}"
    collector = Collector(CollectorSettings(broker="mqtt://127.0.0.1:1", db=url))
    acks: list[tuple[str, dict[str, object]]] = []
    monkeypatch.setattr(
        collector.client, "publish", lambda topic, body, qos: acks.append((topic, json.loads(body)))
    )
    boot = uuid.uuid4().hex
    topic = "edgefleet/v1/devices/d1/predictions"
    broken_results = {**_message(boot, 3, 1, [3]), "results": [{"seq": "x"}]}
    batch = [
        (topic, json.dumps(_message(boot, 1, 1, [1])).encode()),
        (topic, b"[" * 50_000),  # under the size cap, deeper than any parser's stack
        (topic, json.dumps(_message(boot, 2, 1, [2])).encode().replace(b"0.5", b"NaN")),
        (topic, json.dumps(broken_results).encode()),
        (topic, json.dumps({**_message(boot, 10**30, 1, [4])}).encode()),
        (topic, json.dumps(_message(boot, 4, 1, [4])).encode()),
    ]
    collector._store_batch(batch)
    cur = collector.store.cursor()
    cur.execute(
        collector.store._q("SELECT seq FROM predictions WHERE boot_id = ? ORDER BY seq"), (boot,)
    )
    assert [row[0] for row in cur.fetchall()] == [1, 4]
    assert collector.rejected == 4
    # Messages 2 and 3 named their place: the acknowledgement moves past them, so the device
    # does not resend them forever and message 4 is confirmed.
    assert acks == [("edgefleet/v1/devices/d1/ack", {"boot_id": boot, "mseq": 4})]
    collector.store.close()


def test_collectors_starting_together_create_the_schema_once() -> None:
    """Several collectors on an empty PostgreSQL database: none fails creating the tables."""
    import threading

    import psycopg

    if not _pg_available():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    for _ in range(5):
        schema = f"race_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")
        url = f"{PG_URL}?options=-csearch_path%3D{schema}"
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []

        def start(
            url: str = url,
            barrier: threading.Barrier = barrier,
            errors: list[BaseException] = errors,
        ) -> None:
            barrier.wait()
            try:
                Store(url).close()
            except Exception as exc:  # noqa: BLE001 - the test reports whatever a thread raised
                errors.append(exc)

        threads = [threading.Thread(target=start) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            tables = admin.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s",
                (schema,),
            ).fetchone()
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
        assert errors == []
        assert tables is not None
        assert tables[0] == 4
