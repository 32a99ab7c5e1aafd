"""Argument types for the command line: a bad value is one line and exit 2, from argparse."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.errors import UserError
from edgefleet.protocol import ID_PATTERN

if TYPE_CHECKING:
    from edgefleet.dashboard import LabelRule
MAX_CHUNK = 16 * 1024 * 1024


def int_between(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number in ``[low, high]`` (no upper bound when ``high`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound}")
        return value

    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def version(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of at least 1")
    return int(text)


def chunk_size(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_CHUNK:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 1 and {MAX_CHUNK} bytes")
    return int(text)


def name(text: str) -> str:
    if not re.match(ID_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: letters, digits, '_', '.', '-', starting with a letter or digit (max 64)"
        )
    return text


def target(text: str) -> str:
    if text == "fleet":
        return text
    kind, _, name = text.partition(":")
    if kind not in ("device", "group") or not re.match(ID_PATTERN, name):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use device:ID, group:NAME or fleet (IDs: letters, digits, '_', '.', '-')"
        )
    return text


def rate(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def waves(text: str) -> list[float]:
    try:
        waves = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: percentages, e.g. 10,50,100") from None
    if not waves or any(not 0 < w <= 100 for w in waves) or waves != sorted(waves):
        raise argparse.ArgumentTypeError(f"{text!r}: rising percentages in (0, 100]")
    return waves


def label_rule(text: str) -> LabelRule:
    from edgefleet.dashboard import LabelRule

    try:
        return LabelRule.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def read_secret(path: str | None, flag: str = "--password-file") -> str | None:
    """The secret in the file ``flag`` names (stripped), or None; a clear error when unreadable."""
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UserError(f"{flag} {path}: {exc.strerror}") from None


def unit_fraction(text: str) -> float:
    """A share from 0 to 1, both included (e.g. a least accuracy)."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1")
    return value


def split_fraction(text: str) -> float:
    """A share of a folder held out: at least 0, below 1."""
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 0 and below 1")
    return value
