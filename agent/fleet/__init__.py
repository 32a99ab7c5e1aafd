"""The operator side: collector, release publishing and waves, broker administration."""
