"""Results as one readable line each, for a person at a terminal (``sinks: [{type: console}]``).

Colours only on a terminal; never hard-wrapped, so a pipe or a log file gets whole lines.
The model is named on each line: after a rollout the line says what classified it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from edgefleet.plugin import hookimpl
from edgefleet.plugin.registry import PluginConfig, Registry
from edgefleet.runtime.results import Result
from edgefleet.runtime.sinks import Sink

if TYPE_CHECKING:
    from rich.console import Console


class ConsoleConfig(PluginConfig):
    """``sinks: [{type: console}]``."""

    type: Literal["console"] = "console"
    top: int = Field(default=3, ge=1, le=10, description="labels shown per line")
    stderr: bool = Field(default=False, description="write to stderr instead of stdout")


class ConsoleSink(Sink):
    name = "console"

    def __init__(self, config: ConsoleConfig, console: Console | None = None) -> None:
        # rich is imported by the sink, not by the module: every plugin module is loaded at
        # start, and a daemon that never writes to a terminal need not map rich's modules.
        from rich.console import Console
        from rich.markup import escape

        self.config = config
        self.console = console or Console(stderr=config.stderr, soft_wrap=True)
        self._escape = escape

    def open(self, context: dict[str, Any]) -> None:
        escape = self._escape
        model = context["model"]
        self.console.print(
            f"[bold]edgefleet {context['agent_version']}[/] device "
            f"[cyan]{escape(context['device_id'])}[/] model [green]{escape(model['name'])}[/] "
            f"v{model['version']} sha256 {model['sha256'][:12]}"
        )

    def emit(self, result: Result) -> None:
        escape = self._escape
        best = ", ".join(f"{t.label} {t.score:.2f}" for t in result.top[: self.config.top])
        ms = result.timings_ms
        self.console.print(
            f"#{result.seq:<4} {escape(result.origin):<16} [bold]{escape(best)}[/]  "
            f"[dim]{escape(result.model)} v{result.model_version}, "
            f"infer {ms['inference']:.1f} ms, prep {ms['preprocess']:.1f} ms[/]"
        )


@hookimpl
def edgefleet_register_sinks(registry: Registry[Sink]) -> None:
    registry.add("console", ConsoleConfig, ConsoleSink, "one readable line per result")
