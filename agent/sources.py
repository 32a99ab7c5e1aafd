"""Deprecated: the names of ``edgefleet.sources`` are in ``edgefleet.plugin`` now.

Kept so that plugins written before the stable plugin API still load (with a
DeprecationWarning); see ``edgefleet.plugin``.
"""

from edgefleet.plugin.moved import warn_moved

warn_moved(__name__)

from edgefleet.runtime.sources import (  # noqa: E402
    EndOfStream,
    OpenCvSource,
    Source,
    SourceStatus,
    ThreadedSource,
)

__all__ = ["EndOfStream", "OpenCvSource", "Source", "SourceStatus", "ThreadedSource"]
