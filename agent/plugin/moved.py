"""The plugin API's old module paths: each still imports, and says where its names went."""

from __future__ import annotations

import warnings


def warn_moved(old: str) -> None:
    """Called by a compatibility module as it is imported: one DeprecationWarning."""
    warnings.warn(
        f"{old} is deprecated: import from edgefleet.plugin (the stable plugin API)",
        DeprecationWarning,
        stacklevel=3,
    )
