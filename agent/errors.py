"""Exception types that carry a user-facing message (printed on one line, exit code 2)."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: bad config, missing file, unsupported model."""


class ConfigError(UserError):
    """A configuration file or override failed validation; the message lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class ModelError(UserError):
    """A model file is missing, corrupt or has an input/output this agent cannot serve."""


class SourceError(Exception):
    """A frame source failed to open or read; sources retry these with backoff."""
