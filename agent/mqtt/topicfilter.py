"""MQTT topic filters, split once and matched against each incoming topic.

paho's ``topic_matches_sub`` builds a matcher tree on every call (5 us on a 2-core VM); the
link matches every message it receives against each of its routes, and a model download
brings a message every fraction of a millisecond.
"""

from __future__ import annotations


class TopicFilter:
    """A subscription filter: ``+`` matches one level (an empty one too), a trailing ``#``
    the rest of the topic and its parent; a filter starting with a wildcard does not match a
    topic starting with ``$`` (MQTT 3.1.1 4.7.2, MQTT 5 4.7.2)."""

    __slots__ = ("_levels", "_rest", "_wild_first", "text")

    def __init__(self, text: str) -> None:
        levels = text.split("/")
        self._rest = levels[-1] == "#"
        self._levels = tuple(levels[:-1] if self._rest else levels)
        self._wild_first = (not self._levels) or self._levels[0] in ("+", "#")
        self.text = text

    def matches(self, topic: str) -> bool:
        return self.matches_levels(topic.split("/"))

    def matches_levels(self, parts: list[str]) -> bool:
        """Whether the topic split at "/" into ``parts`` matches (split once per message)."""
        levels = self._levels
        if len(parts) != len(levels) and not (self._rest and len(parts) > len(levels)):
            return False
        if self._wild_first and parts[0].startswith("$"):
            return False
        # strict=False: under a trailing "#" the topic has more levels than the filter.
        return all(want in (got, "+") for want, got in zip(levels, parts, strict=False))

    def __repr__(self) -> str:
        return f"TopicFilter({self.text!r})"
