"""Reconciliation asks a provider for a day's statement only for a day that can have one."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pytest

from services.billing.reconciliation import service
from shared.timeutil import utcnow


class NeverAsked:
    def statement(self, day: date) -> Any:
        raise AssertionError("the provider must not be asked for this day")


@pytest.mark.parametrize(
    "day",
    [
        date(1, 1, 1),
        date(1999, 12, 31),
        utcnow().astimezone(service.SHANGHAI).date() + timedelta(days=1),
        date(9999, 12, 31),
    ],
)
def test_a_day_without_a_statement_is_refused_before_the_provider_is_asked(day: date) -> None:
    with pytest.raises(service.DayOutOfRange) as refused:
        service.reconcile(None, {"sandbox": NeverAsked()}, "sandbox", day)  # type: ignore[arg-type, dict-item]
    assert refused.value.status == 422
    assert refused.value.code == "reconciliation_day_out_of_range"
