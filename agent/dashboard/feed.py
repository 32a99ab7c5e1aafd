"""A fleet view fed from broker messages: statuses, metrics, predictions, rollout states."""

from __future__ import annotations

from typing import Any

import structlog

from edgefleet.dashboard.view import DEVICE_LEAVES, FleetView
from edgefleet.protocol import loads

log = structlog.get_logger(__name__)


def feed(view: FleetView, topic: str, payload: bytes) -> bool:
    """Hand one message to the view by its topic; False when it is not one the view reads."""
    parts = topic.split("/")
    if len(parts) >= 4 and parts[-2:] == ["model", "desired"]:
        kind = "group" if parts[-4] == "groups" else "device"
        body = _object(payload) if payload else None
        view.on_desired(f"{kind}:{parts[-3]}", body)
        return True
    if len(parts) < 3 or parts[-3] != "devices":
        return False
    device, leaf = parts[-2], parts[-1]
    if leaf not in DEVICE_LEAVES:
        return False
    body = _object(payload) if payload else None
    if body is not None:
        view.observe(leaf, device, body)
    return True


def _object(payload: bytes) -> dict[str, Any] | None:
    try:
        body = loads(payload)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None
