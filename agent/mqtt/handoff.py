"""What crosses between the link's threads: a publish handed to the network thread, a
message handed from it."""

from __future__ import annotations

from dataclasses import dataclass

from paho.mqtt.properties import Properties


@dataclass
class Send:
    """A publish handed from another thread to the network thread."""

    row: int | None  # spool row id; None for status and replies
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None


@dataclass
class Incoming:
    topic: str
    payload: bytes
    response_topic: str | None
    correlation: bytes | None
