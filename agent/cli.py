"""The ``edgefleet`` command line.

User errors (bad config, missing model, unusable input) print one line per problem and
exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgefleet import __version__, logs
from edgefleet.errors import ConfigError, UserError

DEFAULT_CONFIG = Path("/etc/edgefleet/agent.yaml")
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"}


def _config_path(value: str | None) -> Path:
    return Path(value or os.environ.get("EDGEFLEET_CONFIG") or DEFAULT_CONFIG)


def cmd_check_config(args: argparse.Namespace) -> int:
    from edgefleet.config import load_config
    from edgefleet.pluginmanager import make_plugin_manager

    path = Path(args.file)
    plugins = make_plugin_manager()
    config = load_config(path, plugins.registries)
    # A second pass honours the file's own block list, as `run` will.
    if config.core.plugins.block:
        plugins = make_plugin_manager(block=config.core.plugins.block)
        load_config(path, plugins.registries)
    print(f"{path}: ok")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgefleet.pluginmanager import make_plugin_manager

    block: list[str] = []
    if args.config:
        from edgefleet.config import load_config

        config = load_config(Path(args.config), make_plugin_manager().registries)
        block = config.core.plugins.block
    plugins = make_plugin_manager(block=block)
    console = Console(width=max(100, Console().width))
    table = Table(title="edgefleet plugins")
    for column in ("plugin", "origin", "status", "provides", "hooks"):
        table.add_column(column)
    provided: dict[str, list[str]] = {}
    for registry in (
        plugins.registries.sources,
        plugins.registries.delegates,
        plugins.registries.sinks,
    ):
        for entry in registry.entries():
            provided.setdefault(entry.plugin, []).append(f"{registry.kind}:{entry.type}")
    for record in plugins.records:
        status = record.status if not record.error else f"{record.status}: {record.error}"
        table.add_row(
            record.name,
            record.origin,
            status,
            ", ".join(provided.get(record.name, [])),
            ", ".join(h.removeprefix("edgefleet_") for h in record.hooks),
        )
    console.print(table)
    failed = [r for r in plugins.records if r.status == "failed"]
    if failed:
        console.print(f"{len(failed)} plugin(s) failed to load; the agent runs without them.")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from edgefleet.agent import Agent
    from edgefleet.config import load_config
    from edgefleet.pluginmanager import make_plugin_manager

    path = _config_path(args.config)
    config = load_config(path, make_plugin_manager().registries)
    logs.configure(config.core.logging.level, config.core.logging.format)
    plugins = make_plugin_manager(block=config.core.plugins.block)
    config = load_config(path, plugins.registries)
    return Agent(config, plugins).run(duration=args.duration)


def _iter_inputs(inputs: list[str]) -> Iterator[Path]:
    from edgefleet_plugins.sources.images import IMAGE_SUFFIXES, list_images

    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            yield from list_images(str(path))
        elif path.suffix.lower() in VIDEO_SUFFIXES or path.suffix.lower() in IMAGE_SUFFIXES:
            yield path
        elif path.exists():
            yield path  # let the decoder say what is wrong with it
        else:
            matches = list_images(raw)
            if not matches:
                print(f"error: {raw}: no such file", file=sys.stderr)
            yield from matches


def _video_frames(path: Path, every: int) -> Iterator[tuple[int, Any]]:
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"{path}: cannot open video")
    index = 0
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            if index % every == 0:
                yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        cap.release()
    if index == 0:
        raise ValueError(f"{path}: no decodable frames")


def cmd_classify(args: argparse.Namespace) -> int:
    from edgefleet.classifier import load_classifier
    from edgefleet.factory import factory_model_path
    from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate
    from edgefleet_plugins.sources.images import decode_image

    model = Path(args.model) if args.model else factory_model_path()
    delegate = CpuDelegate(CpuConfig(threads=args.threads))
    classifier = load_classifier(model, delegate, labels_file=args.labels)
    failures = 0
    seen = 0

    def emit(record: dict[str, Any], image: Any) -> None:
        started = time.perf_counter()
        scores = classifier.classify(image)
        top = classifier.top(scores, args.top_k)
        record["top"] = [
            {"label": t.label, "index": t.index, "score": round(t.score, 5)} for t in top
        ]
        record["ms"] = round((time.perf_counter() - started) * 1e3, 3)
        print(json.dumps(record, ensure_ascii=False), flush=True)

    for path in _iter_inputs(args.inputs):
        seen += 1
        try:
            if path.suffix.lower() in VIDEO_SUFFIXES:
                for index, frame in _video_frames(path, args.every):
                    emit({"input": str(path), "frame": index}, frame)
            else:
                emit({"input": str(path)}, decode_image(path))
        except ValueError as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
    if seen == 0:
        raise UserError("no inputs to classify")
    return 1 if failures else 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json as _json

    from rich.console import Console
    from rich.table import Table

    from edgefleet.classifier import sha256_file
    from edgefleet.factory import factory_model_path
    from edgefleet.pluginmanager import make_plugin_manager
    from edgefleet.selection import choose, default_candidates

    model = Path(args.model) if args.model else factory_model_path()
    registry = make_plugin_manager().registries.delegates
    raw = _json.loads(args.candidates) if args.candidates else default_candidates(registry)
    sections = []
    for item in raw:
        entry = registry.get(str(item.get("type")))
        if entry is None:
            raise UserError(f"unknown delegate type {item.get('type')!r}")
        sections.append(entry.config_model.model_validate(item))
    choice = choose(
        "auto", sections, registry, model, sha256_file(model), budget_s=args.budget, cache_dir=None
    )
    table = Table(title=f"delegates for {model.name}")
    for column in ("candidate", "median ms", "p90 ms", "IQR ms", "runs", "note"):
        table.add_column(column)
    for row in choice.table:
        table.add_row(
            row.label,
            *(
                f"{v:.2f}" if v is not None else "-"
                for v in (row.median_ms, row.p90_ms, row.spread_ms)
            ),
            str(row.runs),
            row.reason,
        )
    console = Console(width=max(110, Console().width))
    console.print(table)
    console.print(
        f"auto picks: [bold]{choice.best[0].label}[/] (decided in {choice.seconds:.1f} s)"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edgefleet.demo import run_demo

    return run_demo(duration=args.duration)


def cmd_collect(args: argparse.Namespace) -> int:
    import signal
    import threading

    from edgefleet.collector import Collector, CollectorSettings

    password = None
    if args.password_file:
        password = Path(args.password_file).read_text(encoding="utf-8").strip()
    settings = CollectorSettings(
        broker=args.broker,
        db=args.db,
        prefix=args.prefix,
        protocol=args.protocol,
        share_group=args.share_group or None,
        username=args.username,
        password=password,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
    )

    def echo(kind: str, device: str, body: dict[str, Any]) -> None:
        if kind == "predictions":
            for result in body.get("results", []):
                top = result.get("top") or [{}]
                print(
                    f"{device} #{result.get('seq')} {top[0].get('label')} "
                    f"{top[0].get('score', 0):.2f}",
                    flush=True,
                )

    collector = Collector(settings, echo=echo if args.print else None)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    collector.start()
    done.wait()
    collector.stop()
    return 0


def cmd_add_device(args: argparse.Namespace) -> int:
    from edgefleet.brokeradmin import add_device

    password = None
    if args.password_file:
        password = Path(args.password_file).read_text(encoding="utf-8").strip()
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


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from edgefleet.release import generate_keys

    private, public = generate_keys(Path(args.out), args.key_id)
    print(f"private key: {private} (keep it off the devices)")
    print(f"public key:  {public} (list it under rollout.trusted_keys.{args.key_id})")
    return 0


def _operator(args: argparse.Namespace) -> Any:
    from edgefleet.rolloutcli import Broker

    password = None
    if args.password_file:
        password = Path(args.password_file).read_text(encoding="utf-8").strip()
    return Broker(args.broker, args.username, password, args.ca)


def cmd_rollout_publish(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from edgefleet.rolloutcli import build_release, publish_release

    models = {"cpu": Path(args.model)}
    for item in args.variant or []:
        kind, _, path = item.partition("=")
        if kind not in ("cpu", "edgetpu", "gpu", "any") or not path:
            raise UserError(f"--variant {item!r}: use KIND=FILE (cpu, edgetpu, gpu, any)")
        models[kind] = Path(path)
    manifest, blobs = build_release(
        models,
        args.name,
        args.version,
        Path(args.key),
        args.key_id or Path(args.key).stem,
        args.expires_in * 3600,
        chunk_size=args.chunk_size,
        rollback=args.rollback,
        expected_top1=args.expected_top1,
    )
    broker = _operator(args)
    if args.waves:
        return _publish_waves(args, broker, manifest, blobs)
    try:
        with Progress() as progress:
            task = progress.add_task("chunks", total=1)

            def advance(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            publish_release(broker, manifest, blobs, args.target, args.prefix, advance)
    finally:
        broker.close()
    print(
        f"rollout {manifest.rollout_id}: {manifest.name} v{manifest.version} -> "
        f"{', '.join(args.target)}"
    )
    return 0


def _publish_waves(args: argparse.Namespace, broker: Any, manifest: Any, blobs: Any) -> int:
    from edgefleet.rolloutcli import run_waves

    try:
        group = None
        for target in args.target:
            kind, _, name = target.partition(":")
            if kind == "group":
                group = name
            elif target != "fleet":
                raise UserError("--waves takes --target group:NAME or --target fleet")
        waves = [float(x) for x in args.waves.split(",")]
        ok = run_waves(
            broker,
            manifest,
            blobs,
            group,
            waves,
            args.max_failure_rate,
            args.prefix,
            args.wave_timeout,
        )
    finally:
        broker.close()
    return 0 if ok else 1


def cmd_rollout_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgefleet.rolloutcli import rollout_states

    broker = _operator(args)
    try:
        states = rollout_states(broker, args.prefix)
    finally:
        broker.close()
    table = Table(title="rollouts")
    for column in ("device", "state", "model", "version", "progress", "reason"):
        table.add_column(column)
    for device, state in sorted(states.items()):
        table.add_row(
            device,
            str(state.get("state")),
            str(state.get("name", "")),
            str(state.get("version", "")),
            str(state.get("progress", "")),
            str(state.get("reason", "")),
        )
    Console().print(table)
    return 0


def cmd_rollout_clear(args: argparse.Namespace) -> int:
    from edgefleet.rolloutcli import clear_release

    broker = _operator(args)
    try:
        count = clear_release(broker, args.name, args.version, args.prefix)
    finally:
        broker.close()
    print(f"cleared {count} retained chunks of {args.name} v{args.version}")
    return 0


def _add_rollout_commands(sub: Any) -> None:
    keys = sub.add_parser("keys", help="release signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    gen = keys_sub.add_parser("generate", help="an Ed25519 key pair")
    gen.add_argument("--out", default=".", help="folder for KEY_ID.key and KEY_ID.pub")
    gen.add_argument("--key-id", default="release")
    gen.set_defaults(func=cmd_keys_generate)

    rollout = sub.add_parser("rollout", help="publish and watch model rollouts")
    rsub = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    common.add_argument("--prefix", default="edgefleet/v1")
    common.add_argument("--username")
    common.add_argument("--password-file")
    common.add_argument("--ca", type=Path)
    pub = rsub.add_parser("publish", parents=[common], help="chunk, sign and publish a model")
    pub.add_argument("model")
    pub.add_argument("--name", required=True)
    pub.add_argument("--version", required=True, type=int)
    pub.add_argument(
        "--target", required=True, action="append", help="device:ID or group:NAME (repeatable)"
    )
    pub.add_argument("--key", required=True, help="Ed25519 private key (PEM)")
    pub.add_argument("--key-id", help="default: the key file's name")
    pub.add_argument("--variant", action="append", help="KIND=FILE, e.g. edgetpu=m_edgetpu.tflite")
    pub.add_argument("--expires-in", type=float, default=24 * 7, help="hours (default 168)")
    pub.add_argument("--chunk-size", type=int, default=128 * 1024)
    pub.add_argument("--rollback", action="store_true", help="allow a lower version")
    pub.add_argument("--expected-top1", help="label the probe image must give (self-test)")
    pub.add_argument("--waves", help="percentages, e.g. 10,50,100 (devices from status topics)")
    pub.add_argument("--max-failure-rate", type=float, default=0.05)
    pub.add_argument("--wave-timeout", type=float, default=600.0, help="seconds per wave")
    pub.set_defaults(func=cmd_rollout_publish)
    status = rsub.add_parser("status", parents=[common], help="per-device rollout state")
    status.set_defaults(func=cmd_rollout_status)
    clear = rsub.add_parser("clear", parents=[common], help="remove a release's chunks")
    clear.add_argument("name")
    clear.add_argument("version", type=int)
    clear.set_defaults(func=cmd_rollout_clear)


def cmd_schema(args: argparse.Namespace) -> int:
    from edgefleet.config import json_schema
    from edgefleet.pluginmanager import make_plugin_manager

    text = json.dumps(json_schema(make_plugin_manager().registries), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _add_fleet_commands(sub: Any) -> None:
    collect = sub.add_parser("collect", help="store the fleet's reports in a database, ack them")
    collect.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://...")
    collect.add_argument(
        "--db",
        default="sqlite:///edgefleet-collector.db",
        help="sqlite:///PATH or postgresql://user@host/db",
    )
    collect.add_argument("--prefix", default="edgefleet/v1")
    collect.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    collect.add_argument(
        "--share-group",
        default="edgefleet-collectors",
        help="MQTT 5 shared-subscription group ('' to disable)",
    )
    collect.add_argument("--username")
    collect.add_argument("--password-file")
    collect.add_argument("--ca", type=Path)
    collect.add_argument("--cert", type=Path)
    collect.add_argument("--key", type=Path)
    collect.add_argument("--print", action="store_true", help="print predictions as they come")
    collect.set_defaults(func=cmd_collect)

    broker = sub.add_parser("broker", help="broker administration")
    broker_sub = broker.add_subparsers(dest="broker_command", required=True, metavar="ACTION")
    add = broker_sub.add_parser("add-device", help="password or client certificate + ACL")
    add.add_argument("device")
    add.add_argument("--acl", required=True, help="the mosquitto ACL file to extend")
    add.add_argument("--groups", help="comma-separated groups the device belongs to")
    add.add_argument("--prefix", default="edgefleet/v1")
    add.add_argument("--passwd", help="mosquitto password file (password mode)")
    add.add_argument("--password-file", help="read the password here (default: generate)")
    add.add_argument("--ca-cert", type=Path, help="fleet CA certificate (mTLS mode)")
    add.add_argument("--ca-key", type=Path, help="fleet CA private key (mTLS mode)")
    add.add_argument("--out", type=Path, help="where to write the device's certificate and key")
    add.set_defaults(func=cmd_add_device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet", description="Edge vision agent for fleets of Pi and Coral devices."
    )
    parser.add_argument("--version", action="version", version=f"edgefleet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent (the daemon)")
    run.add_argument(
        "-c", "--config", help=f"config file (default $EDGEFLEET_CONFIG or {DEFAULT_CONFIG})"
    )
    run.add_argument("--duration", type=float, help="stop after this many seconds")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file (exit 0 when valid)")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    plugins = sub.add_parser("plugins", help="list plugins, what they provide, load failures")
    plugins.add_argument("-c", "--config", help="apply this config's block list")
    plugins.set_defaults(func=cmd_plugins)

    classify = sub.add_parser("classify", help="classify images, folders or videos (JSON lines)")
    classify.add_argument("inputs", nargs="+", metavar="INPUT")
    classify.add_argument("--model", help="model file (default: the factory model)")
    classify.add_argument("--labels", type=Path, help="labels file overriding embedded labels")
    classify.add_argument("--top-k", type=int, default=5)
    classify.add_argument("--threads", type=int, default=None)
    classify.add_argument("--every", type=int, default=1, help="video: every Nth frame")
    classify.set_defaults(func=cmd_classify)

    bench = sub.add_parser("bench", help="measure every delegate candidate on a model")
    bench.add_argument("model", nargs="?", help="model file (default: the factory model)")
    bench.add_argument("--budget", type=float, default=5.0, help="total seconds of timing")
    bench.add_argument("--candidates", help='JSON list, e.g. [{"type":"cpu","threads":1}]')
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="classify the bundled sample photos live")
    demo.add_argument("--duration", type=float, default=None, help="seconds (default: Ctrl-C)")
    demo.set_defaults(func=cmd_demo)

    _add_fleet_commands(sub)
    _add_rollout_commands(sub)

    schema = sub.add_parser("schema", help="print the config JSON schema")
    schema.add_argument("--out", help="write to this file")
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Until `run` reads its config, log to stderr: stdout carries results.
    logs.configure("info" if args.command in ("run", "demo") else "warning")
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
