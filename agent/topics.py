"""Every topic a device, the collector, the operator tools and the broker's ACL use.

Part of the wire format that ``edgefleet.protocol`` owns (and re-exports): topics are built
here and nowhere else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

DEFAULT_PREFIX = "edgefleet/v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Topics:
    """Every topic one device publishes or subscribes to."""

    prefix: str
    device: str

    def _dev(self, leaf: str) -> str:
        return f"{self.prefix}/devices/{self.device}/{leaf}"

    @property
    def status(self) -> str:
        return self._dev("status")

    @property
    def predictions(self) -> str:
        return self._dev("predictions")

    @property
    def metrics(self) -> str:
        return self._dev("metrics")

    @property
    def events(self) -> str:
        return self._dev("events")

    @property
    def ack(self) -> str:
        return self._dev("ack")

    @property
    def commands(self) -> str:
        return self._dev("cmd/+")

    @property
    def rollout(self) -> str:
        return self._dev("rollout")

    @property
    def desired(self) -> str:
        return self._dev("model/desired")

    @property
    def decision(self) -> str:
        return self._dev("model/decision")

    def group_commands(self, group: str) -> str:
        return f"{self.prefix}/groups/{group}/cmd/+"

    def group_desired(self, group: str) -> str:
        return f"{self.prefix}/groups/{group}/model/desired"

    def group_decision(self, group: str) -> str:
        return f"{self.prefix}/groups/{group}/model/decision"

    def reply(self, request_id: str) -> str:
        return self._dev(f"reply/{request_id}")

    def spooled(self, kind: str) -> str:
        """The topic of a spooled message kind (predictions, metrics, events)."""
        return self._dev(kind)

    @staticmethod
    def command_name(topic: str) -> str | None:
        """The command in a ``.../cmd/NAME`` topic addressed to this device or its groups."""
        parts = topic.split("/")
        if len(parts) < 2 or parts[-2] != "cmd":
            return None
        return parts[-1]


SHARED_CHUNKS: Final = "_chunks"


@dataclass(frozen=True)
class FleetTopics:
    """Topics seen from the fleet side: every device at once, releases, targets."""

    prefix: str = DEFAULT_PREFIX

    def device(self, device: str) -> Topics:
        return Topics(self.prefix, device)

    def every_device(self, leaf: str) -> str:
        """``{prefix}/devices/+/{leaf}``: one leaf of every device."""
        return f"{self.prefix}/devices/+/{leaf}"

    @staticmethod
    def device_of(topic: str) -> str:
        """The device id in ``{prefix}/devices/{id}/...`` (prefixes may contain slashes)."""
        return _segment_after(topic, "devices")

    @staticmethod
    def group_of(topic: str) -> str:
        """The group in ``{prefix}/groups/{group}/...``."""
        return _segment_after(topic, "groups")

    def chunk(self, name: str, version: int, kind: str, index: int) -> str:
        return f"{self.prefix}/models/{name}/{version}/{kind}/{index}"

    def chunks(self, name: str, version: int, kind: str) -> str:
        """Every chunk of one variant (a wildcard filter)."""
        return f"{self.prefix}/models/{name}/{version}/{kind}/+"

    def shared_chunk(self, sha256: str) -> str:
        """A content-defined chunk, retained once for every release that has it (model names
        begin with a letter or digit, so ``_chunks`` is no release's topic)."""
        return f"{self.prefix}/models/{SHARED_CHUNKS}/{sha256}"

    def shared_chunks(self) -> str:
        """Every shared chunk (a wildcard filter)."""
        return f"{self.prefix}/models/{SHARED_CHUNKS}/+"

    @staticmethod
    def chunk_hash_of(topic: str) -> str | None:
        """The sha256 a shared chunk's topic names, or None for another topic."""
        parts = topic.rsplit("/", 2)
        if len(parts) != 3 or parts[1] != SHARED_CHUNKS or not _HEX64.fullmatch(parts[2]):
            return None
        return parts[2]

    def every_group(self, leaf: str) -> str:
        """``{prefix}/groups/+/{leaf}``: one leaf of every group."""
        return f"{self.prefix}/groups/+/{leaf}"

    def release(self, name: str, version: int) -> str:
        """The retained manifest of a published release (its index: what was published)."""
        return f"{self.prefix}/models/{name}/{version}/manifest"

    def every_release(self) -> str:
        """Every published release's retained manifest (a wildcard filter)."""
        return f"{self.prefix}/models/+/+/manifest"

    def all_chunks(self) -> str:
        """Every chunk of every release (a wildcard filter)."""
        return f"{self.prefix}/models/#"

    def release_chunks(self, name: str, version: int) -> str:
        """Every chunk of every variant of a release (a wildcard filter)."""
        return f"{self.prefix}/models/{name}/{version}/+/+"

    def desired(self, target: str) -> str:
        """The retained desired-state topic of ``device:ID`` or ``group:NAME``."""
        return self._model_topic(target, "desired")

    def decision(self, target: str) -> str:
        """The retained operator decision topic (shadow phases) of ``device:ID``/``group:NAME``."""
        return self._model_topic(target, "decision")

    def _model_topic(self, target: str, leaf: str) -> str:
        """``{prefix}/devices/{ID}/model/{leaf}`` or ``{prefix}/groups/{NAME}/model/{leaf}``."""
        kind, _, name = target.partition(":")
        if kind not in ("device", "group"):
            raise ValueError(f"target {target!r}: use device:ID or group:NAME")
        return f"{self.prefix}/{kind}s/{name}/model/{leaf}"

    def group_command_filter(self, group: str) -> str:
        """What a group member may read of its group's commands (ACL form)."""
        return f"{self.prefix}/groups/{group}/cmd/#"


def _segment_after(topic: str, marker: str) -> str:
    """The level after the last ``marker`` level: the prefix itself may contain it too."""
    parts = topic.split("/")
    return parts[len(parts) - parts[::-1].index(marker)]
