"""Each service's Alembic history builds exactly the schema its models describe, on PostgreSQL
(production) and SQLite (`make run`): a model change without its migration fails here."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydantic import SecretStr
from sqlalchemy import MetaData, create_engine

from services import city
from shared.settings import Settings

pytestmark = pytest.mark.integration

MODELS = [
    "shared.bus.models",
    "services.gateway.models",
    "services.lots.models",
    "services.sessions.models",
    "services.billing.db",
    "services.paysandbox.models",
    "services.vehicleregistry.models",
]


def differences(url: str, metadata: MetaData) -> list[Any]:
    """What autogenerate would write for this metadata, looking at its own tables only (all
    services share one database here, each with its own version table)."""
    mine = set(metadata.tables)

    def include(obj: Any, name: str | None, type_: str, reflected: bool, other: Any) -> bool:
        table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", None)
        return table is None or table in mine

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "include_object": include}
            )
            return list(compare_metadata(ctx, metadata))
    finally:
        engine.dispose()


@pytest.mark.parametrize("module", MODELS)
def test_postgresql_schema_matches_the_models(settings: Settings, module: str) -> None:
    # `settings` is the session's database, migrated by `citypark migrate`'s own code path.
    metadata = importlib.import_module(module).Base.metadata
    assert metadata.tables, module
    assert differences(settings.database_url, metadata) == []


def test_sqlite_schema_matches_the_models_and_migrate_is_idempotent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'city.db'}"
    s = Settings(database_url=url, jwt_secret=SecretStr("migrations-test-secret-of-32-bytes"))
    city.migrate(s)
    city.migrate(s)  # a second run finds every service at head
    for module in MODELS:
        assert differences(url, importlib.import_module(module).Base.metadata) == [], module
