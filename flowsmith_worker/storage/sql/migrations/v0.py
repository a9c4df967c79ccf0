"""Version 0: fs_schema_version, the record of the versions applied (frozen, see v1).

Created by every migrate before anything else, so that the version already in
place can be read; it is not a step of its own.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

versions = sa.Table(
    "fs_schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", sa.Double(), nullable=False),
)
