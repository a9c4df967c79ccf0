"""The `flowsmith` command line; cli/app.py assembles it (the console script's entry point).

``from flowsmith_worker.cli import main`` keeps working: the group, re-exported.
"""

from flowsmith_worker.cli.app import main

__all__ = ["main"]
