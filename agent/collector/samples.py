"""Samples from devices (the data flywheel), joined from their pieces and stored by hash.

A device is untrusted. Each ``samples`` message is one piece of a kept frame; pieces wait in
``sample_pieces`` (in the same transaction as their acknowledgement, so a collector restart
loses no piece a device has let go of) until all are there. Then the whole file is checked:
its size and sha256 against what the pieces say, its header against a pixel budget before it
is decoded (``inference.images``), its decoded size against its metadata. A good sample is
written once under ``DIR/ab/<sha256>.jpg`` and gets a row in ``samples``; the same picture
again (another boot, another device) is a duplicate, kept once. Each refusal is counted by
reason in ``sample_counts`` and logged; the pieces go, the acknowledgement moves on, nothing
else is lost. Retention removes the oldest samples (unlabelled first) past an age or a
total size, and pieces that never completed after a day.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from edgefleet.collector.store import Cursor, Store
from edgefleet.fsutil import atomic_write_bytes
from edgefleet.inference.images import decode_bytes
from edgefleet.protocol import SamplePiece

log = structlog.get_logger(__name__)

SAMPLE_TABLES = [
    """CREATE TABLE IF NOT EXISTS sample_pieces (
        device TEXT NOT NULL, sample TEXT NOT NULL, piece INTEGER NOT NULL,
        pieces INTEGER NOT NULL, size BIGINT NOT NULL, data TEXT NOT NULL, meta TEXT,
        received DOUBLE PRECISION NOT NULL, PRIMARY KEY (device, sample, piece))""",
    """CREATE TABLE IF NOT EXISTS samples (
        sample TEXT PRIMARY KEY, device TEXT NOT NULL, ts DOUBLE PRECISION,
        received DOUBLE PRECISION NOT NULL, model TEXT NOT NULL, model_version BIGINT NOT NULL,
        predicted TEXT, score DOUBLE PRECISION, top TEXT NOT NULL, triggers TEXT NOT NULL,
        shadow TEXT, width INTEGER NOT NULL, height INTEGER NOT NULL, bytes BIGINT NOT NULL,
        label TEXT, skipped BOOLEAN NOT NULL DEFAULT FALSE, labelled_by TEXT,
        labelled_at DOUBLE PRECISION)""",
    """CREATE TABLE IF NOT EXISTS sample_counts (reason TEXT PRIMARY KEY, n BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS sample_classes (
        model TEXT NOT NULL, label TEXT NOT NULL, idx INTEGER NOT NULL,
        PRIMARY KEY (model, label))""",
]
SAMPLE_PIXELS = 40_000_000  # a full 4K frame is 8.3 MP; a sample claiming more is refused
STALE_PIECES_S = 24 * 3600.0


def create_tables(store: Store) -> None:
    store.create_tables(SAMPLE_TABLES)


def sample_path(folder: Path, sample: str) -> Path:
    return folder / sample[:2] / f"{sample}.jpg"


def triggers_text(triggers: list[str]) -> str:
    """Stored as ``,a,b,`` so that one trigger is found with LIKE '%,a,%'."""
    return "," + ",".join(triggers) + ","


@dataclass
class SampleSettings:
    folder: Path = Path("edgefleet-samples")
    max_age_days: float = 90.0
    max_mib: float = 10240.0


class SampleIntake:
    """Pieces in, checked samples out; one per collector, on its storing thread."""

    def __init__(self, store: Store, settings: SampleSettings) -> None:
        self.store = store
        self.s = settings
        self.counts: dict[str, int] = {}
        create_tables(store)
        self._pruned_at = 0.0

    def _q(self, sql: str) -> str:
        return self.store._q(sql)

    def take(self, cur: Cursor, device: str, body: dict[str, Any]) -> str:
        """Store one piece; say what became of it (``stored`` when it completed a sample)."""
        try:
            piece = SamplePiece.model_validate(body)
            data = base64.b64decode(piece.data, validate=True)
        except (ValidationError, binascii.Error, ValueError) as exc:
            return self._refuse(cur, device, None, "bad_piece", str(exc).splitlines()[0])
        if piece.piece >= piece.pieces or (piece.piece == 0) != (piece.meta is not None):
            return self._refuse(cur, device, None, "bad_piece", "piece numbering or meta")
        if self._known(cur, piece.sample):
            self._drop_pieces(cur, device, piece.sample)
            return self._count(cur, "duplicate")
        meta = piece.meta.model_dump_json() if piece.meta is not None else None
        cur.execute(
            self._q(
                "INSERT INTO sample_pieces(device, sample, piece, pieces, size, data, meta, "
                "received) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"
            ),
            (device, piece.sample, piece.piece, piece.pieces, piece.size,
             base64.b64encode(data).decode(), meta, time.time()),
        )  # fmt: skip
        cur.execute(
            self._q("SELECT count(*) FROM sample_pieces WHERE device = ? AND sample = ?"),
            (device, piece.sample),
        )
        if int(cur.fetchone()[0]) < piece.pieces:
            return "piece"
        return self._complete(cur, device, piece.sample)

    def _complete(self, cur: Cursor, device: str, sample: str) -> str:
        cur.execute(
            self._q(
                "SELECT piece, pieces, size, data, meta FROM sample_pieces "
                "WHERE device = ? AND sample = ? ORDER BY piece"
            ),
            (device, sample),
        )
        rows = cur.fetchall()
        self._drop_pieces(cur, device, sample)
        pieces, size = int(rows[0][1]), int(rows[0][2])
        if [int(r[0]) for r in rows] != list(range(pieces)) or any(
            int(r[1]) != pieces or int(r[2]) != size for r in rows
        ):
            return self._refuse(cur, device, sample, "bad_piece", "pieces disagree")
        data = b"".join(base64.b64decode(r[3]) for r in rows)
        if len(data) != size:
            return self._refuse(cur, device, sample, "bad_size", f"{len(data)} != {size}")
        if hashlib.sha256(data).hexdigest() != sample:
            return self._refuse(cur, device, sample, "bad_hash", "sha256 differs")
        meta = json.loads(rows[0][4])
        try:
            pixels = decode_bytes(data, f"sample {sample[:12]}", SAMPLE_PIXELS)
        except ValueError as exc:
            return self._refuse(cur, device, sample, "undecodable", str(exc))
        if pixels.shape[:2] != (meta["height"], meta["width"]):
            return self._refuse(cur, device, sample, "bad_meta", "size differs from the image")
        path = sample_path(self.s.folder, sample)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)  # before the row commits: a row never lacks its file
        top = meta.get("top") or [{}]
        cur.execute(
            self._q(
                "INSERT INTO samples(sample, device, ts, received, model, model_version, "
                "predicted, score, top, triggers, shadow, width, height, bytes) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"
            ),
            (sample, device, meta["ts"], time.time(), meta["model"], meta["model_version"],
             top[0].get("label"), top[0].get("score"), json.dumps(meta["top"]),
             triggers_text(meta["triggers"]),
             json.dumps(meta["shadow"]) if meta.get("shadow") else None,
             meta["width"], meta["height"], len(data)),
        )  # fmt: skip
        return self._count(cur, "stored")

    def _known(self, cur: Cursor, sample: str) -> bool:
        cur.execute(self._q("SELECT 1 FROM samples WHERE sample = ?"), (sample,))
        return cur.fetchone() is not None

    def _drop_pieces(self, cur: Cursor, device: str, sample: str) -> None:
        cur.execute(
            self._q("DELETE FROM sample_pieces WHERE device = ? AND sample = ?"), (device, sample)
        )

    def _refuse(
        self, cur: Cursor, device: str, sample: str | None, reason: str, detail: str
    ) -> str:
        if sample is not None:
            self._drop_pieces(cur, device, sample)
        log.warning("sample refused", device=device, reason=reason, detail=detail[:200])
        return self._count(cur, reason)

    def _count(self, cur: Cursor, reason: str) -> str:
        cur.execute(
            self._q(
                "INSERT INTO sample_counts(reason, n) VALUES (?, 1) "
                "ON CONFLICT(reason) DO UPDATE SET n = sample_counts.n + 1"
            ),
            (reason,),
        )
        self.counts[reason] = self.counts.get(reason, 0) + 1
        return reason

    # -- retention ------------------------------------------------------------------------
    def prune(self, now: float | None = None) -> int:
        """Remove what is past the age or the total size (unlabelled first), in a transaction
        of its own, then the files; how many went."""
        now = time.time() if now is None else now
        cur = self.store.cursor()
        # Pieces split between collectors of one database (a shared subscription) may each
        # have seen the set incomplete in their own transaction: whoever sweeps completes it.
        cur.execute(
            "SELECT device, sample FROM sample_pieces GROUP BY device, sample "
            "HAVING count(*) >= max(pieces)"
        )
        for device, sample in cur.fetchall():
            self._complete(cur, device, sample)
        cur.execute(
            self._q("DELETE FROM sample_pieces WHERE received < ?"), (now - STALE_PIECES_S,)
        )
        cur.execute(
            self._q("SELECT sample FROM samples WHERE received < ?"),
            (now - self.s.max_age_days * 86400,),
        )
        doomed = [row[0] for row in cur.fetchall()]
        cur.execute(
            "SELECT sample, bytes FROM samples ORDER BY (label IS NOT NULL) DESC, received DESC"
        )
        total, budget = 0, int(self.s.max_mib * 1024 * 1024)
        keep_order = cur.fetchall()
        for sample, size in keep_order:
            total += int(size)
            if total > budget and sample not in doomed:
                doomed.append(sample)
        for sample in doomed:
            cur.execute(self._q("DELETE FROM samples WHERE sample = ?"), (sample,))
        self.store.commit()
        for sample in doomed:
            sample_path(self.s.folder, sample).unlink(missing_ok=True)
        if doomed:
            log.info("samples past retention removed", removed=len(doomed))
        return len(doomed)

    def prune_due(self, every_s: float = 60.0) -> bool:
        now = time.monotonic()
        if now - self._pruned_at < every_s:
            return False
        self._pruned_at = now
        return True
