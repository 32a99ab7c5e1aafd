"""A device's rollout state as the fleet sees it: one retained message, kept for reconnects."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import structlog

from edgefleet.protocol import Manifest
from edgefleet.rollout.ports import LinkPort

log = structlog.get_logger(__name__)


class StateReport:
    """Publishes each rollout state retained on ``topic`` and remembers the last one."""

    def __init__(self, link: LinkPort, topic: str, device: str, state_dir: Path) -> None:
        self.link = link
        self.topic = topic
        self.device = device
        self.state_dir = state_dir
        self.state: dict[str, Any] = {}
        # What the latest download cost (rollout_id, figures): in every later state of it.
        self.figures: tuple[str, dict[str, int]] | None = None

    def announce(self) -> list[tuple[str, bytes]]:
        """The last state again, retained, after each (re)connection: one reached while the
        link was down would otherwise never reach the fleet."""
        state = self.state
        return [(self.topic, json.dumps(state).encode())] if state else []

    def publish(self, state: str, manifest: Manifest | None, **fields: Any) -> None:
        body: dict[str, Any] = {"state": state, "device": self.device, "ts": time.time()}
        if manifest is not None:
            body.update(
                rollout_id=manifest.rollout_id, name=manifest.name, version=manifest.version
            )
            if self.figures is not None and self.figures[0] == manifest.rollout_id:
                body.update(self.figures[1])
        body.update(fields)
        if isinstance(body.get("reason"), str):
            # Paths in reasons are the device's own business: report them within the store.
            body["reason"] = body["reason"].replace(f"{self.state_dir}/", "")
        self.state = body
        self.link.publish_now(self.topic, json.dumps(body).encode(), retain=True)
        log.info("rollout", **{k: v for k, v in body.items() if k not in ("device", "ts")})
