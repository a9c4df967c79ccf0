"""The web dashboard: an ASGI app (Starlette, Jinja2) over the storage's operator queries.

    from flowsmith_worker.dashboard import create_app
    app = create_app()          # mount it in FastAPI, Starlette or Django (ASGI)

`flowsmith dashboard` serves it with uvicorn. It needs the ``dashboard`` extra
(pip install 'flowsmith-worker[dashboard]'); importing this package does not,
so that the `flowsmith` command works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowsmith_worker.dashboard.app import create_app
    from flowsmith_worker.dashboard.security import Credentials

__all__ = ["Credentials", "create_app"]


def __getattr__(name: str) -> Any:
    """Import the app (and Starlette with it) only when it is asked for."""
    if name == "create_app":
        from flowsmith_worker.dashboard.app import create_app

        return create_app
    if name == "Credentials":
        from flowsmith_worker.dashboard.security import Credentials

        return Credentials
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
