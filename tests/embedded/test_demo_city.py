"""`make run`'s demo city: seeding covers every district and is idempotent."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from sqlalchemy import func, select

from services import city, demo
from services.billing.driver.models import Driver
from services.lots.models import Lot
from shared.settings import BusKind, CacheKind, Settings
from shared.topics import SUZHOU_DISTRICTS


def test_seeding_the_demo_city_is_complete_and_idempotent(tmp_path: Path) -> None:
    settings = Settings(
        bus=BusKind.log,
        cache=CacheKind.memory,
        database_url=f"sqlite:///{tmp_path / 'demo.db'}",
        jwt_secret=SecretStr("demo-test-secret-long-enough-for-hs256"),
    )
    _, rt = city.embedded(settings)
    first = demo.seed(rt, tmp_path / "keys")
    second = demo.seed(rt, tmp_path / "keys")
    assert first == second
    assert {entry["district"] for entry in first} == {d.code for d in SUZHOU_DISTRICTS}
    assert all((tmp_path / "keys" / f"{entry['key_id']}.key").exists() for entry in first)
    with rt.sessionmaker() as db:
        assert db.scalar(select(func.count()).select_from(Lot)) == len(first)
        assert db.scalar(select(func.count()).select_from(Driver)) == demo.DEMO_DRIVERS
