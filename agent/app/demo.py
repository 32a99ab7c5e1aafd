"""``edgefleet demo``: a local broker, an agent on the bundled photos, and a collector.

What is printed is what came back *through the broker* into the collector's database:
predictions as they are stored, and each metrics message. Without mosquitto on the machine,
the demo classifies locally and says so. Ctrl-C stops everything.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from edgefleet import logs
from edgefleet.app.daemon import Daemon
from edgefleet.collector import Echo
from edgefleet.config.agentconfig import load_config
from edgefleet.errors import UserError
from edgefleet.plugin.manager import make_plugin_manager
from edgefleet.protocol import FleetTopics, loads
from edgefleet.rollout.release import generate_keys
from edgefleet.samples import sample_dir

if TYPE_CHECKING:
    from edgefleet.dashboard import Dashboard, FleetView
DEMO_DEVICE = "demo-device"
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if Path(p).exists()), None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def local_broker(binary: str, workdir: Path, extra: str = "") -> Iterator[int]:
    """A private mosquitto on a free loopback port, up and listening; ``extra`` config lines."""
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"user root\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
        f"persistence false\nlog_dest none\nset_tcp_nodelay true\n{extra}"
    )
    # Its own session: a Ctrl-C at the terminal reaches the agent, which stops first and
    # says "stopped" through this broker; the broker goes last, when this block ends.
    proc = subprocess.Popen(
        [binary, "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def _config_text(broker_port: int | None, state: Path, public_key: str = "") -> str:
    # Offline, results are shown by the console sink; online, as they come back through the
    # broker into the collector.
    fleet = ""
    if broker_port is not None:
        pem = public_key.replace("\n", "\\n")
        fleet = (
            "fleet:\n"
            f"  url: mqtt://127.0.0.1:{broker_port}\n"
            "  metrics_interval_s: 5\n"
            "  ack_mode: collector\n"
            f'rollout: {{trusted_keys: {{demo: "{pem}"}}, health_frames: 4}}\n'
        )
    return (
        f"device: {{id: {DEMO_DEVICE}, groups: [demo]}}\n"
        f"source: {{type: images, path: '{sample_dir()}', loop: true, fps: 2}}\n"
        "model: {top_k: 3}\n"
        f"state_dir: '{state}'\n"
        "logging: {level: warning}\n"
        f"sinks: {'[]' if fleet else '[{type: console}]'}\n"
        f"{fleet}"
    )


def _echo(console: Console) -> Echo:
    def echo(kind: str, device: str, body: dict[str, Any]) -> None:
        if kind == "predictions":
            for result in body.get("results", []):
                best = ", ".join(f"{t['label']} {t['score']:.2f}" for t in result["top"][:3])
                timings = result.get("timings_ms", {})
                model = f"{result.get('model')} v{result.get('model_version')}"
                console.print(
                    f"[cyan]{device}[/] #{result['seq']:<4} [green]{model}[/] "
                    f"{result.get('origin', ''):<14} [bold]{best}[/]  "
                    f"[dim]{timings.get('inference', 0):.1f} ms[/]"
                )
        elif kind == "metrics":
            inference = body.get("latency_ms", {}).get("inference", {})
            console.print(
                f"[magenta]{device} metrics[/] fps {body.get('fps')} "
                f"inference p50 {inference.get('p50')} ms p99 {inference.get('p99')} ms, "
                f"spool depth {body.get('spool', {}).get('depth')}, "
                f"dropped frames {body.get('dropped_frames')}"
            )

    return echo


def second_model() -> Path | None:
    """The float model committed beside the package (a source checkout has it)."""
    candidate = Path(__file__).resolve().parents[2] / "models" / "efficientnet-lite0-fp32.tflite"
    return candidate if candidate.exists() else None


def _rollout_later(console: Console, port: int, key: Path, daemon: Daemon) -> None:
    """After a few results, roll the float model out to the demo device, live."""
    from edgefleet.operator import Broker, build_release, publish_release

    model = second_model()
    time.sleep(6)
    if model is None or daemon.stop_requested.is_set():
        return
    console.print(f"[yellow]rolling out {model.name} as release v1 (signed, chunked)...[/]")
    manifest, blobs = build_release({"cpu": model}, "lite0-float", 1, key, "demo", 3600)
    operator = Broker(f"mqtt://127.0.0.1:{port}")
    try:
        publish_release(operator, manifest, blobs, [f"device:{DEMO_DEVICE}"])
        states = operator.collect(FleetTopics().device(DEMO_DEVICE).rollout, 4.0)
    finally:
        operator.close()
    for payload in states.values():
        with contextlib.suppress(ValueError):
            state = loads(payload)
            extra = f": {state['reason']}" if state.get("reason") else ""
            console.print(
                f"[yellow]rollout {state.get('name')} v{state.get('version')} "
                f"{state.get('state')}{escape(extra)}[/]"
            )


def _fleet_page(console: Console, view: FleetView, bind: str | None) -> Dashboard | None:
    """The fleet page on loopback (a free port unless ``bind`` says), or None if it cannot
    be had: the demo goes on without it."""
    from edgefleet.dashboard import Dashboard

    try:
        dashboard = Dashboard(view, bind or "127.0.0.1:0")
    except UserError as exc:
        console.print(f"[yellow]no fleet page: {escape(str(exc))}[/]")
        return None
    dashboard.start()
    console.print(f"[bold]fleet page: {dashboard.url}[/] (the device, live; Ctrl-C stops)")
    return dashboard


def run_demo(duration: float | None = None, http: str | None = None) -> int:
    from edgefleet.collector import Collector, CollectorSettings
    from edgefleet.dashboard import FleetView

    console = Console(soft_wrap=True)  # whole lines, also when piped
    logs.configure("warning", "console")
    binary = find_mosquitto()
    plugins = make_plugin_manager()
    with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
        work = Path(tmp)
        if binary is None:
            console.print(
                "[yellow]mosquitto not found: classifying locally, no broker.[/] "
                "(apt install mosquitto for the full demo)"
            )
            config = load_config(
                None, plugins.registries, environ={}, text=_config_text(None, work)
            )
            return Daemon(config, plugins).run(duration)
        with local_broker(binary, work) as port:
            console.print(
                f"[dim]local mosquitto on 127.0.0.1:{port}; agent -> broker -> "
                "collector (SQLite); Ctrl-C stops.[/]"
            )
            view = FleetView()
            collector = Collector(
                CollectorSettings(
                    broker=f"mqtt://127.0.0.1:{port}", db=f"sqlite:///{work / 'fleet.db'}"
                ),
                echo=_echo(console),
                view=view,
            )
            collector.start()
            dashboard = _fleet_page(console, view, http)
            private, public = generate_keys(work / "keys", "demo")
            text = _config_text(port, work, public.read_text())
            config = load_config(None, plugins.registries, environ={}, text=text)
            daemon = Daemon(config, plugins)
            rollout = threading.Thread(
                target=_rollout_later, daemon=True, args=(console, port, private, daemon)
            )
            rollout.start()
            try:
                return daemon.run(duration=duration)
            finally:
                time.sleep(0.3)
                if dashboard is not None:
                    dashboard.stop()
                collector.stop()
                console.print(f"[dim]collector stored {collector.stored} messages[/]")
