"""edgefleet: an edge vision agent for fleets of Raspberry Pi and Coral devices."""

__version__ = "0.1.0"
