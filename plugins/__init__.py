"""Built-in edgefleet plugins, loaded through the ``edgefleet.plugins`` entry-point group."""
