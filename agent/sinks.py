"""Deprecated: the names of ``edgefleet.sinks`` are in ``edgefleet.plugin`` now.

Kept so that plugins written before the stable plugin API still load (with a
DeprecationWarning); see ``edgefleet.plugin``.
"""

from edgefleet.plugin.moved import warn_moved

warn_moved(__name__)

from edgefleet.runtime.sinks import Sink  # noqa: E402

__all__ = ["Sink"]
