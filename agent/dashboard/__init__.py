"""The fleet as people watch it: the live view (states and ages by the clock), fleet-wide
latency, the web pages and JSON API, ``/metrics`` and webhook alerts.

The public entry: ``FleetView`` (and ``feed``, which fills one from broker messages),
``Dashboard`` (the HTTP server), ``Alerter`` with ``LabelRule`` and ``webhook_poster``,
``exposition`` (the Prometheus text).
"""

from edgefleet.dashboard.alerts import Alerter, LabelRule, webhook_poster
from edgefleet.dashboard.feed import feed
from edgefleet.dashboard.promexport import exposition
from edgefleet.dashboard.server import Dashboard
from edgefleet.dashboard.view import FleetView

__all__ = ["Alerter", "Dashboard", "FleetView", "LabelRule", "exposition", "feed", "webhook_poster"]
