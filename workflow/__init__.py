"""workflow (in progress)."""
