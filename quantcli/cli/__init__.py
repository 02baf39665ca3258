"""The ``quantcli`` command line: Typer commands, and everything the user reads (Rich tables, JSON, HTML)."""

from quantcli.cli.app import app, main

__all__ = ["app", "main"]
