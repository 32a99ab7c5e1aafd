"""Fleet commands: the collector and broker enrolment (rollouts: ``edgefleet.cli.rollout``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.cli.args import label_rule, positive_float, read_secret
from edgefleet.cli.login import add_login_arguments, login_from
from edgefleet.errors import UserError
from edgefleet.protocol import DEFAULT_PREFIX

if TYPE_CHECKING:
    from edgefleet.collector import Echo
    from edgefleet.dashboard import Alerter, Dashboard, FleetView


def cmd_collect(args: argparse.Namespace) -> int:
    import signal
    import threading

    from edgefleet.collector import Collector, CollectorSettings, SampleSettings
    from edgefleet.dashboard import FleetView

    login = login_from(args)
    samples_dir = Path(args.samples)
    if not samples_dir.parent.is_dir():
        raise UserError(f"--samples {samples_dir}: folder {samples_dir.parent} does not exist")
    settings = CollectorSettings(
        broker=args.broker,
        db=args.db,
        prefix=args.prefix,
        protocol=args.protocol,
        share_group=args.share_group or None,
        username=login.username,
        password=login.password,
        ca=login.ca,
        cert=login.cert,
        key=login.key,
        samples=SampleSettings(samples_dir, args.samples_max_age_days, args.samples_max_mib),
    )
    if args.alert_label and args.alert_webhook is None:
        raise UserError("--alert-label needs --alert-webhook URL")
    wants_view = args.http is not None or args.alert_webhook is not None
    view = FleetView(stale_factor=args.stale_factor) if wants_view else None
    alerter = _alerter(args, view) if view is not None else None
    echoes: list[Echo] = []
    if args.print:
        echoes.append(_print_prediction)
    if alerter is not None:
        echoes.append(alerter.on_stored)

    def echo(kind: str, device: str, body: dict[str, Any]) -> None:
        for fn in echoes:
            fn(kind, device, body)

    def counters() -> dict[str, int]:  # read by /metrics, once the collector runs
        return {"stored": collector.stored, "rejected": collector.rejected}

    # Every argument is checked (and the port bound) before the database is opened.
    dashboard = _dashboard(args, view, counters) if view is not None else None
    collector = Collector(
        settings,
        echo=echo if echoes else None,
        say=lambda text: print(text, flush=True),
        view=view,
    )
    if dashboard is not None:
        from edgefleet.collector import SampleCatalog

        dashboard.samples = SampleCatalog(args.db, samples_dir)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"collector: broker {args.broker}, storing into {collector.store.describe()}", flush=True)
    collector.start()
    for part in (dashboard, alerter):
        if part is not None:
            part.start()
    if dashboard is not None:
        print(f"collector: dashboard at {dashboard.url}", flush=True)
    done.wait()
    for part in (alerter, dashboard):
        if part is not None:
            part.stop()
    collector.stop()
    print(
        f"collector stopped: {collector.stored} messages stored, {collector.rejected} rejected",
        flush=True,
    )
    return 0


def _print_prediction(kind: str, device: str, body: dict[str, Any]) -> None:
    if kind == "predictions":
        for result in body.get("results", []):
            top = result.get("top") or [{}]
            print(
                f"{device} #{result.get('seq')} {top[0].get('label')} {top[0].get('score', 0):.2f}",
                flush=True,
            )


def _dashboard(
    args: argparse.Namespace, view: FleetView, counters: Callable[[], dict[str, int]]
) -> Dashboard | None:
    from edgefleet.dashboard import Dashboard

    if args.http is None:
        return None
    token = read_secret(args.http_token_file, "--http-token-file")
    if args.http_token_file is not None and not token:
        raise UserError(f"--http-token-file {args.http_token_file}: the file is empty")
    return Dashboard(
        view,
        args.http,
        token=token,
        counters=counters,
        device_histograms=args.metrics_device_histograms,
    )


def _alerter(args: argparse.Namespace, view: FleetView) -> Alerter | None:
    from edgefleet.dashboard import Alerter, webhook_poster

    if args.alert_webhook is None:
        return None
    return Alerter(
        view,
        webhook_poster(args.alert_webhook),
        labels=args.alert_label,
        min_interval_s=args.alert_interval,
    )


def cmd_add_device(args: argparse.Namespace) -> int:
    from edgefleet.operator import add_device

    password = read_secret(args.password_file)
    groups = [g for g in (args.groups or "").split(",") if g]
    written = add_device(
        args.device,
        Path(args.acl),
        groups,
        prefix=args.prefix,
        passwd=Path(args.passwd) if args.passwd else None,
        password=password,
        ca_cert=args.ca_cert,
        ca_key=args.ca_key,
        out=args.out,
    )
    for key, value in written.items():
        print(f"{key}: {value}")
    if "password" in written:
        print("store the password on the device as its mqtt-password credential")
    return 0


def cmd_add_service(args: argparse.Namespace) -> int:
    from edgefleet.operator import add_service

    written = add_service(
        args.name,
        args.role,
        Path(args.acl),
        Path(args.passwd),
        args.prefix,
        password=read_secret(args.password_file),
    )
    for key, value in written.items():
        print(f"{key}: {value}")
    print("reload the broker to apply it (systemctl reload mosquitto)")
    return 0


def cmd_remove_device(args: argparse.Namespace) -> int:
    from edgefleet.operator import remove_device

    done = remove_device(
        args.device,
        Path(args.acl),
        passwd=args.passwd,
        crl=args.crl,
        cert=args.cert,
        ca_cert=args.ca_cert,
        ca_key=args.ca_key,
    )
    for key, value in done.items():
        print(f"{key}: {value}")
    print("reload the broker to apply it (systemctl reload mosquitto)")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from edgefleet.operator import init_broker

    for key, value in init_broker(args.out, args.server_name).items():
        print(f"{key}: {value}")
    return 0


def cmd_crl(args: argparse.Namespace) -> int:
    from edgefleet.operator import revoke

    count = revoke(args.ca_cert, args.ca_key, args.crl)
    print(f"{args.crl}: {count} revoked certificates")
    return 0


def add_fleet_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    collect = sub.add_parser("collect", help="store the fleet's reports in a database, ack them")
    collect.add_argument(
        "--broker",
        required=True,
        help="mqtt://host:port or mqtts://...; a comma list names the brokers of one cluster",
    )
    collect.add_argument(
        "--db",
        default="sqlite:///edgefleet-collector.db",
        help="sqlite:///PATH or postgresql://user@host/db",
    )
    collect.add_argument("--prefix", default=DEFAULT_PREFIX)
    collect.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    collect.add_argument(
        "--share-group",
        default="edgefleet-collectors",
        help="MQTT 5 shared-subscription group ('' to disable)",
    )
    add_login_arguments(collect, who="the collector's", client_cert=True)
    collect.add_argument("--print", action="store_true", help="print predictions as they come")
    kept = collect.add_argument_group("samples (docs/flywheel.md)")
    kept.add_argument(
        "--samples",
        default="edgefleet-samples",
        metavar="DIR",
        help="where devices' kept frames are stored (default ./edgefleet-samples)",
    )
    kept.add_argument(
        "--samples-max-age-days", type=positive_float, default=90.0, help="default 90"
    )
    kept.add_argument(
        "--samples-max-mib",
        type=positive_float,
        default=10240.0,
        help="oldest unlabelled go first past this total (default 10240)",
    )
    web = collect.add_argument_group("dashboard (docs/dashboard.md)")
    web.add_argument(
        "--http", metavar="HOST:PORT", help="serve the dashboard, its API and /metrics here"
    )
    web.add_argument(
        "--http-token-file",
        help="token for the dashboard (Bearer, or basic-auth password); needed beyond loopback",
    )
    web.add_argument(
        "--metrics-device-histograms",
        action="store_true",
        help="/metrics: a latency histogram per device too (20 series each; small fleets)",
    )
    web.add_argument(
        "--stale-factor",
        type=positive_float,
        default=3.0,
        help="stale after this many metrics intervals without data (default 3)",
    )
    alerts = collect.add_argument_group("alerts")
    alerts.add_argument("--alert-webhook", metavar="URL", help="POST alerts (JSON) here")
    alerts.add_argument(
        "--alert-label",
        type=label_rule,
        action="append",
        default=[],
        metavar="LABEL[:SCORE]",
        help="alert when this label is the top-1 at or above SCORE (0.5); repeatable",
    )
    alerts.add_argument(
        "--alert-interval",
        type=positive_float,
        default=300.0,
        help="seconds between two alerts of one kind for one device (default 300)",
    )
    collect.set_defaults(func=cmd_collect)

    _add_broker_commands(sub)


def _add_broker_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    broker = sub.add_parser("broker", help="broker administration")
    broker_sub = broker.add_subparsers(dest="broker_command", required=True, metavar="ACTION")
    add = broker_sub.add_parser("add-device", help="password or client certificate + ACL")
    add.add_argument("device")
    add.add_argument("--acl", required=True, help="the mosquitto ACL file to extend")
    add.add_argument("--groups", help="comma-separated groups the device belongs to")
    add.add_argument("--prefix", default=DEFAULT_PREFIX)
    add.add_argument("--passwd", help="mosquitto password file (password mode)")
    add.add_argument("--password-file", help="read the password here (default: generate)")
    add.add_argument("--ca-cert", type=Path, help="fleet CA certificate (mTLS mode)")
    add.add_argument("--ca-key", type=Path, help="fleet CA private key (mTLS mode)")
    add.add_argument("--out", type=Path, help="where to write the device's certificate and key")
    add.set_defaults(func=cmd_add_device)
    for role, example in (("operator", "op-alice"), ("collector", "collector-1")):
        service = broker_sub.add_parser(
            f"add-{role}",
            help=f"a {role} identity on the fleet-services listener (password + ACL block)",
        )
        service.add_argument("name", help=f"the {role}'s user name, e.g. {example}")
        service.add_argument("--acl", required=True, help="the fleet-services ACL file")
        service.add_argument("--passwd", required=True, help="the fleet-services password file")
        service.add_argument("--prefix", default=DEFAULT_PREFIX)
        service.add_argument("--password-file", help="read the password here (default: generate)")
        service.set_defaults(func=cmd_add_service, role=role)
    remove = broker_sub.add_parser(
        "remove-device", help="delete a device's password or revoke its certificate; ACL too"
    )
    remove.add_argument("device")
    remove.add_argument("--acl", required=True, help="the devices' ACL file")
    remove.add_argument("--passwd", type=Path, help="the devices' password file (password mode)")
    remove.add_argument("--crl", type=Path, help="the CRL the broker reads (mTLS mode)")
    remove.add_argument("--cert", type=Path, help="the device's certificate (mTLS mode)")
    remove.add_argument("--ca-cert", type=Path, help="fleet CA certificate (mTLS mode)")
    remove.add_argument("--ca-key", type=Path, help="fleet CA private key (mTLS mode)")
    remove.set_defaults(func=cmd_remove_device)
    init = broker_sub.add_parser(
        "init", help="a new fleet: CA, server certificate, empty password files and CRL"
    )
    init.add_argument("--out", type=Path, required=True, help="folder to write them into")
    init.add_argument(
        "--server-name",
        action="append",
        required=True,
        help="the broker's DNS name or IP address, as devices reach it (repeatable)",
    )
    init.set_defaults(func=cmd_init)
    crl = broker_sub.add_parser("crl", help="issue the (empty or current) revocation list")
    crl.add_argument("--crl", type=Path, required=True)
    crl.add_argument("--ca-cert", type=Path, required=True)
    crl.add_argument("--ca-key", type=Path, required=True)
    crl.set_defaults(func=cmd_crl)
