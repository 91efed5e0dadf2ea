"""The command line: argument parsing, console rendering, one module per command family, the demo."""

from .main import main

__all__ = ["main"]
