"""The ``nerve`` command."""

from cli._main import main

__all__ = ["main"]
