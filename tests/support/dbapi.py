"""A driver's exception as SQLAlchemy hands it to the dialects after a statement failed."""

from __future__ import annotations

import sqlalchemy as sa


def wrapped(error: Exception, driver_base: type[Exception]) -> sa.exc.DBAPIError:
    """``error`` as SQLAlchemy hands it to us after a statement failed."""
    made = sa.exc.DBAPIError.instance("SELECT 1", None, error, driver_base)
    assert isinstance(made, sa.exc.DBAPIError)
    return made
