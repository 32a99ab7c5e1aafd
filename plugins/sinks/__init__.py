"""Built-in result sinks."""
