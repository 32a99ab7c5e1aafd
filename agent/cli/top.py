"""``edgefleet top``: the fleet view in a terminal, refreshing in place, worst devices first.

Reads the broker directly (``--broker``: a read-only watcher, nothing stored) or a collector's
dashboard API (``--collector http://host:8080``). ``--once`` prints one table and exits (for
scripts and SSH one-liners).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgefleet.cli.args import positive_float, read_secret
from edgefleet.cli.login import add_login_arguments, login_from
from edgefleet.errors import UserError
from edgefleet.protocol import DEFAULT_PREFIX

if TYPE_CHECKING:
    from rich.console import Group

STYLE = {"online": "green", "stale": "yellow", "offline": "bold red", "stopped": "dim"}
SORTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "device": lambda r: r["device"],
    "fps": lambda r: -(r["fps"] or 0.0),
    "age": lambda r: -(r["age_s"] or 0.0),
    "p99": lambda r: -(r["latency_p99_ms"] or 0.0),
    "temp": lambda r: -(r["cpu_temp_c"] or 0.0),
}


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _model(model: dict[str, Any] | None) -> str:
    return f"{model['name']} v{model['version']}" if model else ""


def render(
    fleet: dict[str, Any],
    state: str | None = None,
    group: str | None = None,
    sort: str = "worst",
    note: str = "",
) -> Group:
    """The summary line and the table (server order is worst first)."""
    # rich is imported where it is drawn: every command, the daemon's too, loads this module.
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    rows = [
        r
        for r in fleet.get("devices", [])
        if (state is None or r["state"] == state) and (group is None or group in r["groups"])
    ]
    if sort in SORTS:
        rows.sort(key=SORTS[sort])
    summary = fleet.get("summary", {})
    states = "  ".join(f"{k} {v}" for k, v in sorted(summary.get("by_state", {}).items()))
    head = Text(
        f"{summary.get('devices', 0)} devices  {states}  fleet fps {summary.get('fps_total', 0)}"
        f"  throttled {summary.get('throttled', 0)}"
        f"  not on desired model {summary.get('not_converged', 0)}{note}"
    )
    table = Table(expand=True, title=f"edgefleet fleet ({len(rows)} shown, sort: {sort})")
    for column in ("device", "state", "age", "model → desired", "rollout", "delegate"):
        table.add_column(column, no_wrap=True)
    for column in ("fps", "p50/p99 ms", "°C", "spool"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("last prediction", no_wrap=True)
    for r in rows:
        model = _model(r["model"])
        if r["desired"] and not r["converged"]:
            model = f"{model or 'none'} → {_model(r['desired'])}"
        rollout = r["rollout"] or {}
        prediction = r["prediction"] or {}
        table.add_row(
            r["device"],
            Text(r["state"], style=STYLE.get(r["state"], "")),
            _age(r["age_s"]),
            model,
            " ".join(str(x) for x in (rollout.get("state"), rollout.get("reason")) if x),
            r["delegate"] or "",
            _num(r["fps"], 1),
            "-"
            if r["latency_p50_ms"] is None
            else f"{r['latency_p50_ms']:.1f}/{r['latency_p99_ms']:.1f}",
            _num(r["cpu_temp_c"], 1),
            _num(r["spool_backlog"], 0),
            f"{prediction.get('label')} {prediction.get('score') or 0:.2f}" if prediction else "",
        )
    return Group(head, table)


class _CollectorSource:
    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/") + "/api/fleet"
        self.token = token

    def fleet(self) -> dict[str, Any]:
        request = urllib.request.Request(self.url)  # noqa: S310 - http(s) checked by the caller
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            body: dict[str, Any] = json.loads(response.read())
        return body


def cmd_top(args: argparse.Namespace) -> int:
    if args.collector:
        if not args.collector.startswith(("http://", "https://")):
            raise UserError(f"--collector {args.collector!r}: use http://host:port")
        source = _CollectorSource(args.collector, read_secret(args.token_file, "--token-file"))
        fetch = source.fleet
        stop: Callable[[], None] = lambda: None  # noqa: E731
    else:
        from edgefleet.dashboard import FleetView
        from edgefleet.operator import FleetWatcher

        view = FleetView()
        login = login_from(args)
        watcher = FleetWatcher(
            args.broker,
            view,
            prefix=args.prefix,
            username=login.username,
            password=login.password,
            ca=login.ca,
        )
        watcher.start()
        if not watcher.wait_connected(10):
            watcher.stop()
            reason = watcher.refused or watcher.unreachable or "no answer within 10 s"
            raise UserError(f"cannot reach the broker at {args.broker}: {reason}")
        fetch, stop = view.fleet, watcher.stop
    from rich.console import Console
    from rich.live import Live

    try:
        if args.once:
            time.sleep(args.wait if not args.collector else 0)
            Console().print(render(_fetch(fetch), args.state, args.group, args.sort))
            return 0
        with Live(render({}), refresh_per_second=2, screen=False) as live:
            while True:
                note = ""
                try:
                    fleet = fetch()
                except (OSError, urllib.error.URLError, ValueError) as exc:
                    fleet, note = {}, f"  (collector unreachable: {exc})"
                live.update(render(fleet, args.state, args.group, args.sort, note))
                time.sleep(args.interval)
    finally:
        stop()


def _fetch(fetch: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fetch()
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise UserError(f"cannot read the fleet: {exc}") from None


def add_top_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    top = sub.add_parser("top", help="the fleet live in the terminal, worst devices first")
    where = top.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--broker", help="read the broker directly (mqtt://host:port; a comma list for a cluster)"
    )
    where.add_argument("--collector", help="read a collector's dashboard (http://host:port)")
    top.add_argument("--token-file", help="the collector dashboard's token")
    top.add_argument("--prefix", default=DEFAULT_PREFIX)
    add_login_arguments(top, who="the watcher's")
    top.add_argument("--state", help="only devices in this state (online, stale, offline...)")
    top.add_argument("--group", help="only devices of this group")
    top.add_argument("--sort", choices=["worst", *SORTS], default="worst")
    top.add_argument("--interval", type=positive_float, default=1.0, help="seconds per refresh")
    top.add_argument("--once", action="store_true", help="print one table and exit")
    top.add_argument(
        "--wait",
        type=positive_float,
        default=3.0,
        help="--once with --broker: seconds to gather retained states and metrics first",
    )
    top.set_defaults(func=cmd_top)
