"""Plugins: the hook specifications, the plugin manager and the type registries.

Plugin authors need only ``hookimpl`` from here and the interfaces their types implement
(``edgefleet.runtime.sources.Source``, ``edgefleet.runtime.sinks.Sink``,
``edgefleet.delegation.delegate.Delegate``).
"""

from edgefleet.plugin.hookspecs import hookimpl

__all__ = ["hookimpl"]
