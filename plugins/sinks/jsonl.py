"""Results as JSON lines in a file, rotated by size."""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO, Literal

from pydantic import Field

from edgefleet.plugin import hookimpl
from edgefleet.plugin.registry import PluginConfig, Registry
from edgefleet.runtime.results import Result
from edgefleet.runtime.sinks import Sink


class JsonlConfig(PluginConfig):
    """``sinks: [{type: jsonl, path: results.jsonl}]``."""

    type: Literal["jsonl"] = "jsonl"
    path: Path
    max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, description="rotate beyond this")
    backups: int = Field(default=3, ge=0, le=100, description="rotated files kept")
    flush_interval_s: float = Field(default=1.0, ge=0)


class JsonlSink(Sink):
    name = "jsonl"

    def __init__(self, config: JsonlConfig) -> None:
        self.config = config
        self._fh: IO[str] | None = None
        self._size = 0
        self._last_flush = time.monotonic()

    def _open(self) -> IO[str]:
        if self._fh is None:
            self.config.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.config.path.open("a", encoding="utf-8")
            self._size = self._fh.tell()
        return self._fh

    def emit(self, result: Result) -> None:
        line = result.to_json() + "\n"
        if self._size + len(line) > self.config.max_bytes and self._size > 0:
            self._rotate()
        fh = self._open()
        fh.write(line)
        self._size += len(line)
        now = time.monotonic()
        if now - self._last_flush >= self.config.flush_interval_s:
            fh.flush()
            self._last_flush = now

    def _rotate(self) -> None:
        self.close()
        path = self.config.path
        if self.config.backups == 0:
            path.unlink(missing_ok=True)
            return
        for i in range(self.config.backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            if older.exists():
                older.replace(path.with_name(f"{path.name}.{i + 1}"))
        if path.exists():
            path.replace(path.with_name(f"{path.name}.1"))

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            self._fh.close()
            self._fh = None


@hookimpl
def edgefleet_register_sinks(registry: Registry[Sink]) -> None:
    registry.add("jsonl", JsonlConfig, JsonlSink, "JSON lines file, size-rotated")
