"""Deprecated: the names of ``edgefleet.frames`` are in ``edgefleet.plugin`` now.

Kept so that plugins written before the stable plugin API still load (with a
DeprecationWarning); see ``edgefleet.plugin``.
"""

from edgefleet.plugin.moved import warn_moved

warn_moved(__name__)

from edgefleet.runtime.frames import Frame, LatestSlot  # noqa: E402

__all__ = ["Frame", "LatestSlot"]
