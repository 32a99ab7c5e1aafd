"""Deprecated: the names of ``edgefleet.delegates`` are in ``edgefleet.plugin`` now.

Kept so that plugins written before the stable plugin API still load (with a
DeprecationWarning); see ``edgefleet.plugin``.
"""

from edgefleet.plugin.moved import warn_moved

warn_moved(__name__)

from edgefleet.inference.delegate import Availability, Delegate, Interpreter  # noqa: E402

__all__ = ["Availability", "Delegate", "Interpreter"]
