"""What the rollout room needs from the rest of the agent, and a bounded memory it keeps."""

from __future__ import annotations

import collections
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, TypeVar

from edgefleet.delegation.serving import ServedModel, ServingState
from edgefleet.inference.classifier import Classifier

T = TypeVar("T")


class ServingPort(Protocol):
    """What rollouts need from ``Serving``: load on the serving delegate (or on the CPU beside
    it, for a shadow twin), test-run in the loop's quiet moments, swap, swap back."""

    def kinds(self) -> list[str]: ...

    def load(self, path: Path) -> Classifier: ...

    def load_beside(self, path: Path) -> Classifier: ...

    def quiet(self) -> AbstractContextManager[None]: ...

    def activate(self, model: ServedModel, classifier: Classifier) -> ServingState: ...

    def restore(self, state: ServingState) -> None: ...


class LinkPort(Protocol):
    """What rollouts need from the MQTT link."""

    def publish_now(
        self, topic: str, payload: bytes, qos: int = 1, *, retain: bool = False
    ) -> None: ...

    def subscribe(self, topic: str, qos: int = 1) -> None: ...

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


class Retries:
    """When a failed release may be tried again: per rollout_id, bounded memories."""

    def __init__(self, first_s: float, most_s: float) -> None:
        self.first_s = first_s
        self.most_s = most_s
        self._not_before: BoundedMemo[float] = BoundedMemo()  # rollout_id -> monotonic time
        self._attempts: BoundedMemo[int] = BoundedMemo()  # rollout_id -> retries so far

    def waiting(self, rollout_id: str) -> bool:
        """True while ``rollout_id``'s backoff runs (always, once it is final)."""
        return self._not_before.get(rollout_id, 0) > time.monotonic()

    def failed(self, rollout_id: str, retry: bool, backoff: bool = True) -> float:
        """Note a failure; the seconds until the retry (inf: never). Without ``backoff`` the
        first delay (a full disk: as soon as space may have returned)."""
        delay = float("inf")
        if retry and not backoff:
            delay = self.first_s
        elif retry:
            attempt = self._attempts.get(rollout_id, 0)
            self._attempts[rollout_id] = attempt + 1
            delay = min(self.most_s, self.first_s * 2**attempt)
        self._not_before[rollout_id] = time.monotonic() + delay
        return delay

    def never(self, rollout_id: str) -> None:
        self._not_before[rollout_id] = float("inf")

    def due(self) -> bool:
        """Whether a backoff ended since the last call (that release no longer waits)."""
        now = time.monotonic()
        ended = [key for key, not_before in self._not_before.items() if not_before <= now]
        for key in ended:
            del self._not_before[key]
        return bool(ended)
