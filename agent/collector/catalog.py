"""The stored samples as people use them: a gallery to filter, labels to give, a data set out.

Its own database connection (the web server's threads and the CLI read and write here while
the collector's storing thread writes pieces), one statement at a time under a lock. A label
must be a class of the sample's model: the classes are registered once per model
(``edgefleet samples classes MODEL.tflite``, read from the model file's embedded labels), so
a typo or a class the model has not got is refused, not learned.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from edgefleet.collector.samples import create_tables, sample_path
from edgefleet.collector.store import Store
from edgefleet.errors import UserError
from edgefleet.protocol import SAMPLE_TRIGGERS

_HEX64 = re.compile(r"[0-9a-f]{64}")
STATES = ("unlabelled", "labelled", "skipped", "all")
MAX_PAGE = 500
COLUMNS = (
    "sample, device, ts, received, model, model_version, predicted, score, top, triggers, "
    "shadow, width, height, bytes, label, skipped, labelled_by, labelled_at"
)
_UNSAFE = re.compile(r"[^\w.+-]+")


class LabelRefusedError(ValueError):
    """A label that cannot be given (unknown sample, unknown class, unknown model)."""


def _folder_name(label: str) -> str:
    """A class name as a folder name: path separators and odd characters become '_'."""
    name = _UNSAFE.sub("_", label).strip("._") or "_"
    return name[:100]


class SampleCatalog:
    """Queries and labels over the collector's samples."""

    def __init__(self, db: str, folder: Path) -> None:
        self.store = Store(db)
        self.folder = folder
        self._lock = threading.Lock()
        create_tables(self.store)

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            cur = self.store.cursor()
            cur.execute(self.store._q(sql), params)
            rows = cur.fetchall()
            self.store.commit()
            return rows

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        with self._lock:
            cur = self.store.cursor()
            cur.execute(self.store._q(sql), params)
            self.store.commit()

    # -- the gallery ------------------------------------------------------------------------
    def find(
        self,
        state: str = "unlabelled",
        device: str | None = None,
        trigger: str | None = None,
        model: str | None = None,
        predicted: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Samples newest first, filtered; ValueError for a filter that cannot match."""
        if state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}")
        if trigger is not None and trigger not in SAMPLE_TRIGGERS:
            raise ValueError(f"trigger must be one of {', '.join(SAMPLE_TRIGGERS)}")
        where, params = [], []
        where.append({
            "unlabelled": "label IS NULL AND NOT skipped",
            "labelled": "label IS NOT NULL",
            "skipped": "skipped",
            "all": "1 = 1",
        }[state])  # fmt: skip
        for column, value in (("device", device), ("model", model), ("predicted", predicted)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if trigger is not None:
            where.append("triggers LIKE ?")
            params.append(f"%,{trigger},%")
        clauses = " AND ".join(where)  # fixed texts; every value is a bound parameter
        sql = f"SELECT {COLUMNS} FROM samples WHERE {clauses} ORDER BY received DESC LIMIT ?"  # noqa: S608
        rows = self._rows(sql, (*params, max(1, min(limit, MAX_PAGE))))
        return [_sample(row) for row in rows]

    def facets(self) -> dict[str, Any]:
        """What the filters can offer, and how many samples wait."""
        out: dict[str, Any] = {"triggers": list(SAMPLE_TRIGGERS)}
        for column in ("device", "model", "predicted"):
            rows = self._rows(f"SELECT DISTINCT {column} FROM samples ORDER BY {column}")  # noqa: S608 - fixed column names
            out[f"{column}s"] = [r[0] for r in rows if r[0] is not None]
        counts = self._rows(
            "SELECT count(*), sum(CASE WHEN label IS NULL AND NOT skipped THEN 1 ELSE 0 END) "
            "FROM samples"
        )[0]
        out["total"], out["unlabelled"] = int(counts[0]), int(counts[1] or 0)
        out["refused"] = dict(self._rows("SELECT reason, n FROM sample_counts ORDER BY reason"))
        return out

    def image(self, sample: str) -> bytes | None:
        if not _HEX64.fullmatch(sample):
            return None
        try:
            return sample_path(self.folder, sample).read_bytes()
        except OSError:
            return None

    # -- classes and labels -------------------------------------------------------------------
    def classes(self, model: str) -> list[str]:
        rows = self._rows("SELECT label FROM sample_classes WHERE model = ? ORDER BY idx", (model,))
        return [r[0] for r in rows]

    def set_classes(self, model: str, labels: list[str]) -> None:
        with self._lock:
            cur = self.store.cursor()
            q = self.store._q
            cur.execute(q("DELETE FROM sample_classes WHERE model = ?"), (model,))
            for index, label in enumerate(dict.fromkeys(labels)):
                cur.execute(
                    q("INSERT INTO sample_classes(model, label, idx) VALUES (?,?,?)"),
                    (model, label, index),
                )
            self.store.commit()

    def label(self, sample: str, label: str | None, by: str) -> dict[str, Any]:
        """Give ``sample`` a class of its model, or skip it (``label=None``)."""
        if not _HEX64.fullmatch(sample):
            raise LabelRefusedError("a sample is named by its sha256 (64 hex digits)")
        rows = self._rows("SELECT model FROM samples WHERE sample = ?", (sample,))
        if not rows:
            raise LabelRefusedError(f"no sample {sample[:12]}")
        model = rows[0][0]
        if label is not None:
            known = self.classes(model)
            if not known:
                raise LabelRefusedError(
                    f"no classes known for model {model!r}: "
                    "edgefleet samples classes MODEL.tflite registers them"
                )
            if label not in known:
                raise LabelRefusedError(f"model {model!r} has no class {label!r}")
        self._write(
            "UPDATE samples SET label = ?, skipped = ?, labelled_by = ?, labelled_at = ? "
            "WHERE sample = ?",
            (label, label is None, by[:64], time.time(), sample),
        )
        return {"sample": sample, "label": label, "skipped": label is None, "by": by[:64]}

    # -- out to training ----------------------------------------------------------------------
    def export(
        self, out: Path, model: str | None = None, base: Path | None = None
    ) -> dict[str, int]:
        """Labelled samples as ``out/<class>/<sha256>.jpg`` (what ``models train`` reads),
        with the class folders of ``base`` copied in first when given. Files are named by
        content, so a photo in both is one file and the training split cannot leak it."""
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out}: not empty (export writes a fresh folder)")
        written: dict[str, int] = {}
        if base is not None:
            if not base.is_dir():
                raise UserError(f"--base {base}: not a folder")
            for folder in sorted(p for p in base.iterdir() if p.is_dir()):
                shutil.copytree(folder, out / folder.name, dirs_exist_ok=True)
                written[folder.name] = sum(1 for p in (out / folder.name).iterdir() if p.is_file())
        sql = "SELECT sample, label FROM samples WHERE label IS NOT NULL"
        params: tuple[Any, ...] = ()
        if model is not None:
            sql, params = sql + " AND model = ?", (model,)
        for sample, label in self._rows(sql + " ORDER BY received", params):
            source = sample_path(self.folder, sample)
            if not source.exists():
                continue
            target = out / _folder_name(label) / f"{sample}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
            written[target.parent.name] = written.get(target.parent.name, 0) + 1
        return written

    def close(self) -> None:
        self.store.close()


def _sample(row: tuple[Any, ...]) -> dict[str, Any]:
    (sample, device, ts, received, model, version, predicted, score, top, triggers, shadow,
     width, height, size, label, skipped, by, at) = row  # fmt: skip
    return {
        "sample": sample, "device": device, "ts": ts, "received": received, "model": model,
        "model_version": version, "predicted": predicted, "score": score,
        "top": json.loads(top), "triggers": [t for t in triggers.split(",") if t],
        "shadow": json.loads(shadow) if shadow else None, "width": width, "height": height,
        "bytes": size, "label": label, "skipped": bool(skipped), "labelled_by": by,
        "labelled_at": at,
    }  # fmt: skip
