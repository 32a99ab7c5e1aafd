"""Thousands of virtual devices on the real protocol in one process, for load tests.

The public entry: ``Simulator`` and ``settings_from`` (its settings from the command line's).
"""

from edgefleet.simulator.fleet import Simulator, settings_from

__all__ = ["Simulator", "settings_from"]
