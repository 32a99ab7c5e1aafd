"""The configuration file: YAML with line numbers, core sections, plugin sections, overrides."""
