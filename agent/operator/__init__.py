"""The operator's tools: releases signed, chunked and published, rolled out in waves and
watched; broker enrolment; a read-only watcher of the broker (for ``top``).

The public entry: ``Broker`` (an operator's connection), ``build_release``,
``publish_release``, ``publish_decision``, ``clear_release``, ``check_unpublished``,
``desired_topic``; ``run_waves``, ``watch_devices``, ``target_devices``, ``fleet_view``,
``shadow_text``; the enrolment functions; ``FleetWatcher``.
"""

from edgefleet.operator.brokeradmin import (
    add_device,
    add_service,
    init_broker,
    remove_device,
    revoke,
)
from edgefleet.operator.releases import (
    Broker,
    build_release,
    check_unpublished,
    clear_release,
    desired_topic,
    publish_decision,
    publish_release,
)
from edgefleet.operator.watch import FleetWatcher
from edgefleet.operator.waves import (
    fleet_view,
    run_waves,
    shadow_text,
    target_devices,
    watch_devices,
    wave_order,
)

__all__ = [
    "Broker",
    "FleetWatcher",
    "add_device",
    "add_service",
    "build_release",
    "check_unpublished",
    "clear_release",
    "desired_topic",
    "fleet_view",
    "init_broker",
    "publish_decision",
    "publish_release",
    "remove_device",
    "revoke",
    "run_waves",
    "shadow_text",
    "target_devices",
    "watch_devices",
    "wave_order",
]
