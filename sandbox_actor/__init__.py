"""sandbox_actor (in progress)."""
