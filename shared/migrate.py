"""Alembic, one migration history per service (each owns its tables and version table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, pool
from sqlalchemy.engine import create_engine


def alembic_config(
    script_location: Path, database_url: str, version_table: str, settings: Any = None
) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    cfg.attributes["version_table"] = version_table
    # Migrations that encrypt personal data use these keys (shared/pii_columns.py).
    cfg.attributes["settings"] = settings
    return cfg


def upgrade(
    script_location: Path, database_url: str, version_table: str, settings: Any = None
) -> None:
    cfg = alembic_config(script_location, database_url, version_table, settings)
    command.upgrade(cfg, "head")


def run_env(metadata: MetaData, default_version_table: str) -> None:
    """Body of every service's `migrations/env.py`."""

    def own_tables_only(name: str | None, type_: str, _parent: object) -> bool:
        # Services share one database: never autogenerate drops of a neighbour's tables.
        return type_ != "table" or name in metadata.tables

    cfg = context.config
    version_table = cfg.attributes.get("version_table", default_version_table)
    url = cfg.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url is not set"
    if context.is_offline_mode():
        context.configure(
            url=url,
            target_metadata=metadata,
            version_table=version_table,
            literal_binds=True,
            render_as_batch=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(url, poolclass=pool.NullPool)
    # begin(): SQLite has no transactional DDL, so alembic would not commit by itself.
    with engine.begin() as connection:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            version_table=version_table,
            render_as_batch=True,
            include_name=own_tables_only,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
