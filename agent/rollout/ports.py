"""What the rollout room needs from the rest of the agent, and a bounded memory it keeps."""

from __future__ import annotations

import collections
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, TypeVar

from edgefleet.delegation.serving import ServedModel, ServingState
from edgefleet.inference.classifier import Classifier

T = TypeVar("T")


class ServingPort(Protocol):
    """What rollouts need from ``Serving``: load on the serving delegate, test-run in the
    loop's quiet moments, swap, swap back."""

    def kinds(self) -> list[str]: ...

    def load(self, path: Path) -> Classifier: ...

    def quiet(self) -> AbstractContextManager[None]: ...

    def activate(self, model: ServedModel, classifier: Classifier) -> ServingState: ...

    def restore(self, state: ServingState) -> None: ...


class LinkPort(Protocol):
    """What rollouts need from the MQTT link."""

    def publish_now(
        self, topic: str, payload: bytes, qos: int = 1, *, retain: bool = False
    ) -> None: ...

    def subscribe(self, topic: str) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...


class BoundedMemo(collections.OrderedDict[str, T]):
    """A dict that forgets its oldest entries beyond ``limit`` (no unbounded growth)."""

    def __init__(self, limit: int = 256) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: str, value: T) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)
