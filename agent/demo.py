"""``edgefleet demo``: the factory model on the bundled sample photos, printed live."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from edgefleet.agent import Agent
from edgefleet.config import load_config
from edgefleet.pluginmanager import make_plugin_manager
from edgefleet.results import Result
from edgefleet.samples import sample_dir
from edgefleet.sinks import Sink


class ConsoleSink(Sink):
    """One readable line per result."""

    name = "console"

    def __init__(self, console: Console) -> None:
        self.console = console

    def open(self, context: dict[str, Any]) -> None:
        model = context["model"]
        self.console.print(
            f"[bold]edgefleet {context['agent_version']}[/] device [cyan]{context['device_id']}"
            f"[/] model [green]{model['name']}[/] v{model['version']} "
            f"sha256 {model['sha256'][:12]}"
        )

    def emit(self, result: Result) -> None:
        best = ", ".join(f"{t.label} {t.score:.2f}" for t in result.top[:3])
        ms = result.timings_ms
        self.console.print(
            f"#{result.seq:<4} {result.origin:<16} [bold]{best}[/]  "
            f"[dim]infer {ms['inference']:.1f} ms, prep {ms['preprocess']:.1f} ms[/]"
        )


def run_demo(duration: float | None = None) -> int:
    console = Console()
    plugins = make_plugin_manager()
    text = (
        "device: {id: demo-device}\n"
        f"source: {{type: images, path: '{sample_dir()}', loop: true, fps: 2}}\n"
        "sinks: []\n"
        "model: {top_k: 3}\n"
    )
    config = load_config(None, plugins.registries, text=text, environ={})
    agent = Agent(config, plugins, extra_sinks=[ConsoleSink(console)])
    console.print("[dim]Classifying the bundled sample photos; Ctrl-C stops.[/]")
    return agent.run(duration=duration)
