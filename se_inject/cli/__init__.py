"""The se-inject command: parse, call the public API, render with rich."""

from se_inject.cli.app import app, main

__all__ = ["app", "main"]
