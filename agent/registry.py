"""Deprecated: the names of ``edgefleet.registry`` are in ``edgefleet.plugin`` now.

Kept so that plugins written before the stable plugin API still load (with a
DeprecationWarning); see ``edgefleet.plugin``.
"""

from edgefleet.plugin.moved import warn_moved

warn_moved(__name__)

from edgefleet.plugin.registry import (  # noqa: E402
    PluginConfig,
    Registration,
    Registries,
    Registry,
    nested_section,
)

__all__ = ["PluginConfig", "Registration", "Registries", "Registry", "nested_section"]
