"""Device commands: run the daemon, check a config, list plugins, classify, bench, demo, schema."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet import logs
from edgefleet.errors import UserError

if TYPE_CHECKING:
    from edgefleet.plugin.registry import Registration

DEFAULT_CONFIG = Path("/etc/edgefleet/agent.yaml")
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"}


def _config_path(value: str | None) -> Path:
    return Path(value or os.environ.get("EDGEFLEET_CONFIG") or DEFAULT_CONFIG)


def cmd_check_config(args: argparse.Namespace) -> int:
    from edgefleet.config.agentconfig import load_config
    from edgefleet.plugin.manager import make_plugin_manager

    logs.configure("error")  # what check-config finds, it says itself, one line each
    if args.credentials:
        # What systemd hands the service as $CREDENTIALS_DIRECTORY (install.sh checks with it).
        os.environ["CREDENTIALS_DIRECTORY"] = args.credentials
    path = Path(args.file)
    plugins = make_plugin_manager()
    config = load_config(path, plugins.registries)
    # A second pass honours the file's own block list, as `run` will.
    if config.core.plugins.block:
        plugins = make_plugin_manager(block=config.core.plugins.block)
        load_config(path, plugins.registries)
        for name in plugins.unknown_blocked:
            print(
                f"warning: plugins.block: no installed plugin is called {name!r}", file=sys.stderr
            )
    print(f"{path}: ok")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgefleet.plugin.manager import make_plugin_manager

    block: list[str] = []
    if args.config:
        from edgefleet.config.agentconfig import load_config

        config = load_config(Path(args.config), make_plugin_manager().registries)
        block = config.core.plugins.block
    plugins = make_plugin_manager(block=block)
    console = Console(width=max(100, Console().width))
    table = Table(title="edgefleet plugins")
    for column in ("plugin", "origin", "status", "provides", "here", "hooks"):
        table.add_column(column, overflow="fold")
    provided: dict[str, list[str]] = {}
    here: dict[str, list[str]] = {}
    for registry in (
        plugins.registries.sources,
        plugins.registries.delegates,
        plugins.registries.sinks,
    ):
        for entry in registry.entries():
            provided.setdefault(entry.plugin, []).append(f"{registry.kind}:{entry.type}")
            said = _availability(registry.kind, entry)
            if said:
                here.setdefault(entry.plugin, []).append(said)
    for record in plugins.records:
        status = record.status if not record.error else f"{record.status}: {record.error}"
        if record.deprecated:
            status += (
                " (deprecated imports: "
                + ", ".join(message.split(" is deprecated")[0] for message in record.deprecated)
                + "; use edgefleet.plugin)"
            )
        table.add_row(
            record.name,
            record.origin,
            status,
            ", ".join(provided.get(record.name, [])),
            "; ".join(here.get(record.name, [])),
            ", ".join(h.removeprefix("edgefleet_") for h in record.hooks),
        )
    console.print(table)
    failed = [r for r in plugins.records if r.status == "failed"]
    if failed:
        console.print(f"{len(failed)} plugin(s) failed to load; the agent runs without them.")
    return 0


def _availability(kind: str, entry: Registration[Any]) -> str:
    """Whether a type can work on this machine, with the reason when it cannot."""
    from pydantic import ValidationError

    try:
        if kind == "delegate":
            try:
                config = entry.config_model(type=entry.type)
            except ValidationError as exc:
                needs = ", ".join(str(e["loc"][0]) for e in exc.errors() if e["loc"])
                return f"{entry.type}: depends on its config ({needs})"
            found = entry.factory(config).availability()
            ok, reason = found.ok, found.reason
        elif entry.probe is not None:
            ok, reason = entry.probe()
        else:
            return ""
    except Exception as exc:  # noqa: BLE001 - a probe must not break the listing
        ok, reason = False, f"{type(exc).__name__}: {exc}"
    return f"{entry.type}: available" if ok else f"{entry.type}: unavailable ({reason})"


def cmd_reload(args: argparse.Namespace) -> int:
    """SIGHUP to the agent, then wait until it says it applied the file (or refused it)."""
    import signal

    from edgefleet.app.daemon import RELOAD_RECORD
    from edgefleet.protocol import loads

    record = Path(args.state_dir) / RELOAD_RECORD

    def seen() -> tuple[int, dict[str, Any]]:
        try:
            body = loads(record.read_bytes())
        except (OSError, ValueError):
            return -1, {}
        if not isinstance(body, dict) or body.get("pid") != args.pid:
            return 0, {}  # none yet from this process
        return int(body.get("count", 0)), body

    before, _ = seen()
    try:
        os.kill(args.pid, signal.SIGHUP)
    except ProcessLookupError:
        raise UserError(f"no process {args.pid}") from None
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        count, body = seen()
        if count > max(before, 0):
            if not body.get("ok"):
                raise UserError(f"reload refused: {body.get('error')}")
            print(f"reloaded: {json.dumps(body.get('changed', {}))}")
            return 0
        time.sleep(0.05)
    raise UserError(f"the agent did not confirm the reload within {args.timeout} s")


def cmd_run(args: argparse.Namespace) -> int:
    from edgefleet.app.daemon import Daemon
    from edgefleet.config.agentconfig import load_config
    from edgefleet.plugin.manager import make_plugin_manager

    path = _config_path(args.config)
    config = load_config(path, make_plugin_manager().registries)
    logs.configure(config.core.logging.level, config.core.logging.format)
    plugins = make_plugin_manager(block=config.core.plugins.block)
    config = load_config(path, plugins.registries)
    return Daemon(config, plugins).run(duration=args.duration)


def _iter_inputs(inputs: list[str]) -> Iterator[Path]:
    from edgefleet.inference.images import IMAGE_SUFFIXES, list_images

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
    from edgefleet.factory import factory_model_path
    from edgefleet.inference.classifier import load_classifier
    from edgefleet.inference.delegate import Delegate
    from edgefleet.inference.images import DEFAULT_MAX_PIXELS, decode_image
    from edgefleet.inference.labels import label_dicts
    from edgefleet.plugin.manager import make_plugin_manager

    max_pixels = args.max_pixels or DEFAULT_MAX_PIXELS
    model = Path(args.model) if args.model else factory_model_path()
    # The CPU delegate comes through its registry, as a third-party one would.
    cpu = make_plugin_manager().registries.delegates.get("cpu")
    if cpu is None:
        raise UserError("the cpu delegate plugin is not loaded (see `edgefleet plugins`)")
    delegate: Delegate = cpu.factory(
        cpu.config_model.model_validate({"type": "cpu", "threads": args.threads})
    )
    classifier = load_classifier(model, delegate, labels_file=args.labels)
    failures = 0
    seen = 0

    def emit(record: dict[str, Any], image: Any) -> None:
        started = time.perf_counter()
        scores = classifier.classify(image)
        top = classifier.top(scores, args.top_k)
        record["top"] = label_dicts(top)
        record["ms"] = round((time.perf_counter() - started) * 1e3, 3)
        print(json.dumps(record, ensure_ascii=False), flush=True)

    for path in _iter_inputs(args.inputs):
        seen += 1
        try:
            if path.suffix.lower() in VIDEO_SUFFIXES:
                for index, frame in _video_frames(path, args.every):
                    emit({"input": str(path), "frame": index}, frame)
            else:
                emit({"input": str(path)}, decode_image(path, max_pixels))
        except ValueError as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
    if seen == 0:
        raise UserError("no inputs to classify")
    # Some inputs unusable: 1, the rest classified. None usable: bad input, 2.
    return (2 if failures == seen else 1) if failures else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from rich.console import Console
    from rich.table import Table

    from edgefleet.delegation.selection import choose, default_candidates
    from edgefleet.factory import factory_model_path
    from edgefleet.inference.classifier import sha256_file
    from edgefleet.plugin.manager import make_plugin_manager

    model = Path(args.model) if args.model else factory_model_path()
    if not model.is_file():
        raise UserError(f"{model}: no such model file")
    registry = make_plugin_manager().registries.delegates
    raw = _candidates(args.candidates) if args.candidates else default_candidates(registry)
    sections = []
    for i, item in enumerate(raw):
        entry = registry.get(str(item.get("type")))
        if entry is None:
            known = ", ".join(registry.names())
            raise UserError(
                f"--candidates[{i}]: unknown delegate type {item.get('type')!r} ({known})"
            )
        try:
            sections.append(entry.config_model.model_validate(item))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UserError(f"--candidates[{i}].{where}: {first['msg']}") from None
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


def _candidates(text: str) -> list[dict[str, Any]]:
    from edgefleet.protocol import loads

    try:
        raw = loads(text)
    except ValueError as exc:
        raise UserError(f"--candidates is not JSON: {exc}") from None
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise UserError('--candidates: a JSON list of objects, e.g. [{"type":"cpu","threads":1}]')
    return raw


def cmd_demo(args: argparse.Namespace) -> int:
    from edgefleet.app.demo import run_demo

    return run_demo(duration=args.duration, http=args.http)


def cmd_schema(args: argparse.Namespace) -> int:
    from edgefleet.config.agentconfig import json_schema
    from edgefleet.plugin.manager import make_plugin_manager

    text = json.dumps(json_schema(make_plugin_manager().registries), indent=2) + "\n"
    if args.out:
        try:
            Path(args.out).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise UserError(f"--out {args.out}: {exc.strerror}") from None
    else:
        sys.stdout.write(text)
    return 0
