"""The collector: devices' reports from the broker into SQLite or PostgreSQL, acknowledged.

The public entry (what the command line and the demo import): ``Collector`` with its
``CollectorSettings``, the ``Echo`` callback type, and the ``Store`` it writes through.
"""

from edgefleet.collector.collector import Collector, CollectorSettings, Echo
from edgefleet.collector.store import Store

__all__ = ["Collector", "CollectorSettings", "Echo", "Store"]
