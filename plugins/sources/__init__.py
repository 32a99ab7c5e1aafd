"""Built-in frame sources."""
