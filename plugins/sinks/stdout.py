"""Results as JSON lines on standard output."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Literal, TextIO

from pydantic import Field

from edgefleet.plugin import hookimpl
from edgefleet.plugin.registry import PluginConfig, Registry
from edgefleet.runtime.results import Result
from edgefleet.runtime.sinks import Sink


class StdoutConfig(PluginConfig):
    """``sinks: [{type: stdout}]``."""

    type: Literal["stdout"] = "stdout"
    flush_interval_s: float = Field(default=0.5, ge=0, description="0 = flush every line")


class StdoutSink(Sink):
    name = "stdout"

    def __init__(self, config: StdoutConfig, stream: TextIO | None = None) -> None:
        self.config = config
        self._stream = stream
        self._last_flush = time.monotonic()

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def emit(self, result: Result) -> None:
        self.stream.write(result.to_json() + "\n")
        now = time.monotonic()
        if now - self._last_flush >= self.config.flush_interval_s:
            self.flush()
            self._last_flush = now

    def flush(self) -> None:
        # The reader went away or the stream closed: nothing is left to flush to.
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.stream.flush()


@hookimpl
def edgefleet_register_sinks(registry: Registry[Sink]) -> None:
    registry.add("stdout", StdoutConfig, StdoutSink, "JSON lines on stdout")
