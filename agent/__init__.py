"""edgefleet: an edge vision agent for fleets of Raspberry Pi and Coral devices."""

import sys

__version__ = "0.1.0"


def _import_structlog_without_rich() -> None:
    """Import structlog while ``rich`` cannot be imported, then let ``rich`` be imported again.

    structlog's ``dev`` module (imported by ``import structlog``) loads rich, and with it
    pygments, only to draw tracebacks on a terminal: 70 modules and several MB of resident
    memory in a daemon that logs JSON to the journal. Without rich it formats tracebacks as
    the standard library does. The commands that draw with rich (``top``, ``demo``, rollout
    progress) import it themselves, when they run.
    """
    if "structlog" in sys.modules or "rich" in sys.modules:
        return  # too late (or not needed): whoever imported them first keeps them
    sys.modules["rich"] = None  # type: ignore[assignment] # a None entry makes the import fail
    try:
        import structlog  # noqa: F401 - imported here, under the block, on purpose
    finally:
        del sys.modules["rich"]


_import_structlog_without_rich()
