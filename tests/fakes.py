"""Fakes at the agent's ports (never at paho's: that boundary has its own fakes)."""

from __future__ import annotations

import json


class RecordingLink:
    """``rollout.ports.LinkPort``: every publish, every topic ever subscribed, those held now
    and the most held at once."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.subscribed: list[str] = []
        self.held: set[str] = set()
        self.most = 0
        self.qos: dict[str, int] = {}

    def publish_now(
        self, topic: str, payload: bytes, qos: int = 1, *, retain: bool = False
    ) -> None:
        self.published.append((topic, payload))

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscribed.append(topic)
        self.qos[topic] = qos
        self.held.add(topic)
        self.most = max(self.most, len(self.held))

    def unsubscribe(self, topic: str) -> None:
        self.held.discard(topic)

    def states(self, topic: str) -> list[dict[str, object]]:
        """The JSON bodies published on ``topic`` (a device's rollout states), in order."""
        return [json.loads(body) for t, body in self.published if t == topic]
