"""Deprecated: the names of ``edgefleet.hookspecs`` are in ``edgefleet.plugin`` now.

Kept so that plugins written before the stable plugin API still load (with a
DeprecationWarning); see ``edgefleet.plugin``.
"""

from edgefleet.plugin.moved import warn_moved

warn_moved(__name__)

from edgefleet.plugin.hookspecs import ENTRY_POINT_GROUP, PROJECT, hookimpl, hookspec  # noqa: E402

__all__ = ["ENTRY_POINT_GROUP", "PROJECT", "hookimpl", "hookspec"]
