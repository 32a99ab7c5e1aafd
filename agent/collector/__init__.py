"""The collector: devices' reports from the broker into SQLite or PostgreSQL, acknowledged.

The public entry (what the command line and the demo import): ``Collector`` with its
``CollectorSettings``, the ``Echo`` callback type, the ``Store`` it writes through, and the
samples devices keep for labelling (``SampleSettings``, ``SampleCatalog``).
"""

from edgefleet.collector.catalog import LabelRefusedError, SampleCatalog
from edgefleet.collector.collector import Collector, CollectorSettings, Echo
from edgefleet.collector.samples import SampleSettings
from edgefleet.collector.store import Store

__all__ = [
    "Collector",
    "CollectorSettings",
    "Echo",
    "LabelRefusedError",
    "SampleCatalog",
    "SampleSettings",
    "Store",
]
