"""The plugin API: everything a plugin may import, from this one module, kept stable.

A plugin imports from ``edgefleet.plugin`` only::

    from edgefleet.plugin import PluginConfig, Registry, Sink, hookimpl

Names here keep their meaning across releases (``API_VERSION`` grows when one is added; one
is removed only after a release that warned about it). Where the names live inside the
package (``edgefleet.runtime.sinks`` ...) may change. The module paths of the releases before
this API (``edgefleet.hookspecs``, ``edgefleet.registry``, ``edgefleet.sources``,
``edgefleet.sinks``, ``edgefleet.delegates``, ``edgefleet.results``, ``edgefleet.frames``,
``edgefleet.sourceoffers``) still import, with a DeprecationWarning, which
``edgefleet plugins`` shows beside the plugin that caused it.

Names are resolved when first used, so importing this module loads nothing but the hook
markers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edgefleet.plugin.hookspecs import ENTRY_POINT_GROUP, hookimpl

if TYPE_CHECKING:
    from edgefleet.errors import ModelError, SourceError, UserError
    from edgefleet.inference.delegate import Availability, Delegate, Interpreter
    from edgefleet.inference.images import decode_image, list_images
    from edgefleet.inference.litert import get_runtime
    from edgefleet.plugin.offers import SourceOffer
    from edgefleet.plugin.registry import PluginConfig, Registry, nested_section
    from edgefleet.runtime.frames import Frame
    from edgefleet.runtime.results import Label, Result, ResultFilter
    from edgefleet.runtime.sinks import Sink
    from edgefleet.runtime.sources import EndOfStream, OpenCvSource, Source, ThreadedSource

API_VERSION = 1

# name -> the module that defines it (the name is the same there)
_HOMES = {
    "PluginConfig": "edgefleet.plugin.registry",
    "Registry": "edgefleet.plugin.registry",
    "nested_section": "edgefleet.plugin.registry",
    "SourceOffer": "edgefleet.plugin.offers",
    "Source": "edgefleet.runtime.sources",
    "ThreadedSource": "edgefleet.runtime.sources",
    "OpenCvSource": "edgefleet.runtime.sources",
    "EndOfStream": "edgefleet.runtime.sources",
    "Frame": "edgefleet.runtime.frames",
    "Sink": "edgefleet.runtime.sinks",
    "Result": "edgefleet.runtime.results",
    "Label": "edgefleet.runtime.results",
    "ResultFilter": "edgefleet.runtime.results",
    "Delegate": "edgefleet.inference.delegate",
    "Availability": "edgefleet.inference.delegate",
    "Interpreter": "edgefleet.inference.delegate",
    "get_runtime": "edgefleet.inference.litert",
    "decode_image": "edgefleet.inference.images",
    "list_images": "edgefleet.inference.images",
    "SourceError": "edgefleet.errors",
    "ModelError": "edgefleet.errors",
    "UserError": "edgefleet.errors",
}

__all__ = [
    "API_VERSION",
    "ENTRY_POINT_GROUP",
    "Availability",
    "Delegate",
    "EndOfStream",
    "Frame",
    "Interpreter",
    "Label",
    "ModelError",
    "OpenCvSource",
    "PluginConfig",
    "Registry",
    "Result",
    "ResultFilter",
    "Sink",
    "Source",
    "SourceError",
    "SourceOffer",
    "ThreadedSource",
    "UserError",
    "decode_image",
    "get_runtime",
    "hookimpl",
    "list_images",
    "nested_section",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'edgefleet.plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return __all__
