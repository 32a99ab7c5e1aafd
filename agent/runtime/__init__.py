"""The running loop and what it touches per frame: pipeline, sources, sinks, stats, watchdog."""
