"""Rolling a release out in waves, and watching the devices converge.

``run_waves`` publishes the desired state to a growing share of the target devices (in a
stable order by hash), waits for each wave to end, and halts when a wave's failure rate is
over the limit; ``watch_devices`` follows the rollout states the devices report.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable
from typing import Any

from edgefleet.errors import UserError
from edgefleet.operator.releases import (
    Broker,
    desired_topic,
    json_by_device,
    publish_release,
    rollout_states,
)
from edgefleet.protocol import (
    DEFAULT_PREFIX,
    FleetTopics,
    Manifest,
    Rollout,
    loads,
)

TERMINAL = Rollout.TERMINAL


def wave_order(devices: list[str]) -> list[str]:
    """Who goes first: a stable order from a hash of the device id, the same on every run."""
    return sorted(devices, key=lambda d: hashlib.sha256(d.encode()).hexdigest())


def known_devices(
    broker: Broker, prefix: str, group: str | None, seconds: float = 1.5
) -> list[str]:
    """Devices known from their retained status, in ``group`` when one is given."""
    statuses = json_by_device(broker, FleetTopics(prefix).every_device("status"), seconds)
    return sorted(
        device
        for device, status in statuses.items()
        if group is None or group in (status.get("groups") or [])
    )


def target_devices(broker: Broker, targets: list[str], prefix: str) -> list[str]:
    """The devices ``device:ID``, ``group:NAME`` and ``fleet`` targets name, known now."""
    devices: set[str] = set()
    for target in targets:
        kind, _, name = target.partition(":")
        if kind == "device":
            devices.add(name)
        else:
            devices.update(known_devices(broker, prefix, name if kind == "group" else None))
    return sorted(devices)


Progress = Callable[[dict[str, dict[str, Any]]], None]


def watch_devices(
    broker: Broker,
    manifest: Manifest,
    devices: list[str],
    prefix: str,
    timeout_s: float,
    on_update: Progress | None = None,
) -> dict[str, dict[str, Any]]:
    """Each device's latest rollout state for this release, until all are final or time is up."""
    topics = FleetTopics(prefix)
    broker.client.subscribe(topics.every_device("rollout"), qos=1)
    deadline = time.monotonic() + timeout_s
    states: dict[str, dict[str, Any]] = {}
    while True:
        messages = broker.snapshot()
        for device in devices:
            payload = messages.get(topics.device(device).rollout)
            try:
                state = loads(payload) if payload else None
            except ValueError:
                continue
            if isinstance(state, dict) and state.get("rollout_id") == manifest.rollout_id:
                states[device] = state
        if on_update is not None:
            on_update(states)
        done = all(states.get(d, {}).get("state") in TERMINAL for d in devices)
        if done or time.monotonic() >= deadline:
            return states
        time.sleep(0.2)


def run_waves(
    broker: Broker,
    manifest: Manifest,
    blobs: dict[str, bytes],
    group: str | None,
    waves: list[float],
    max_failure_rate: float,
    prefix: str = DEFAULT_PREFIX,
    wave_timeout_s: float = 600.0,
    report: Callable[[str], None] = print,
    on_update: Progress | None = None,
) -> bool:
    """Publish per-device desired states wave by wave; False when a wave fails too often."""
    publish_release(broker, manifest, blobs, [], prefix)
    order = wave_order(known_devices(broker, prefix, group))
    if not order:
        raise UserError("no devices known from their status topics")
    body = manifest.wire()
    started: set[str] = set()
    for percent in waves:
        wave = order[: max(1, math.ceil(len(order) * percent / 100))]
        for device in wave:
            if device not in started:
                broker.publish(desired_topic(prefix, f"device:{device}"), body).wait_for_publish(30)
                started.add(device)
        states = watch_devices(broker, manifest, wave, prefix, wave_timeout_s, on_update)
        failures = [d for d in wave if states.get(d, {}).get("state") != Rollout.ACTIVE]
        rate = len(failures) / len(wave)
        detail = f": {', '.join(sorted(failures))}" if failures else ""
        report(
            f"wave {percent:g}%: {len(wave)} devices, {len(failures)} not active "
            f"({rate:.0%}){detail}"
        )
        if rate > max_failure_rate:
            report(
                f"halted: failure rate {rate:.0%} > {max_failure_rate:.0%}; "
                f"{len(order) - len(started)} devices stay on their current model"
            )
            return False
    return True


def shadow_text(state: dict[str, Any]) -> str:
    """``12/300 agree 98.2%`` for a rollout state with shadow figures; else empty."""
    shadow = state.get("shadow")
    if not isinstance(shadow, dict):
        return ""
    agreement = shadow.get("agreement")
    agree = f"{agreement:.1%}" if isinstance(agreement, (int, float)) else "-"
    target = shadow.get("target", "?")
    waiting = ", awaiting decision" if state.get("awaiting_decision") else ""
    return f"{shadow.get('samples', 0)}/{target} agree {agree}{waiting}"


def sent_text(state: dict[str, Any]) -> str:
    """What a device's download took from the broker beside the model's size, e.g.
    ``"0.4% of 18.7 MB"`` (the rest it had, or copied from its own models)."""
    size, fetched = state.get("size"), state.get("fetched_bytes")
    if not isinstance(size, int) or not isinstance(fetched, int) or size <= 0:
        return ""
    return f"{100 * fetched / size:.1f}% of {size / 1e6:.1f} MB"


def fleet_view(
    broker: Broker, prefix: str = DEFAULT_PREFIX, seconds: float = 1.5
) -> list[dict[str, Any]]:
    """One row per device known from status, rollout or desired state: desired vs active."""
    topics = FleetTopics(prefix)
    status = json_by_device(broker, topics.every_device("status"), seconds)
    rollout = rollout_states(broker, prefix, 0.3)
    desired = json_by_device(broker, topics.every_device("model/desired"), 0.3)
    groups: dict[str, dict[str, Any]] = {}
    for topic, payload in broker.collect(topics.every_group("model/desired"), 0.3).items():
        with contextlib.suppress(ValueError):
            body = loads(payload) if payload else None
            if isinstance(body, dict):
                groups[FleetTopics.group_of(topic)] = body
    rows = []
    now = time.time()
    for device in sorted({*status, *rollout, *desired}):
        st, ro = status.get(device, {}), rollout.get(device, {})
        want = desired.get(device) or next(
            (groups[g] for g in st.get("groups") or [] if g in groups), None
        )
        model = st.get("model") or {}
        ts = max(float(st.get("ts") or 0), float(ro.get("ts") or 0))
        rows.append(
            {
                "device": device,
                "presence": st.get("state", "unknown"),
                "active": f"{model.get('name')} v{model.get('version')}" if model else "",
                "desired": f"{want.get('name')} v{want.get('version')}" if want else "",
                "state": ro.get("state", ""),
                "progress": shadow_text(ro) or ro.get("progress", ""),
                "reason": ro.get("reason", ""),
                "sent": sent_text(ro),
                "age_s": round(now - ts, 1) if ts else None,
            }
        )
    return rows
