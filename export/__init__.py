"""cleanplate.export — placeholder package; built in its own issue (see DESIGN.md)."""
