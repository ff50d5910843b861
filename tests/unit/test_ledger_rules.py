"""The ledger's money rules, as pure functions: journals balance, commission comes back exactly."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.billing.ledger import service as ledger

amounts = st.integers(min_value=1, max_value=10_000_000)
bps = st.integers(min_value=0, max_value=10_000)


@given(amount=amounts, rate=bps)
def test_a_capture_balances_and_splits_operator_and_city(amount: int, rate: int) -> None:
    fee = ledger.commission_of(amount, rate)
    lines = dict(ledger.capture_lines("sandbox", "op", amount, fee))
    assert sum(lines.values()) == 0
    assert lines[ledger.provider_clearing("sandbox")] == amount
    assert -lines[ledger.operator_payable("op")] - lines[ledger.city_commission("op")] == amount
    assert 0 <= fee <= amount


def test_commission_rounds_half_up_per_charge() -> None:
    assert ledger.commission_of(333, 600) == 20  # 19.98
    assert ledger.commission_of(25, 200) == 1  # 0.5 → 1
    assert ledger.commission_of(24, 200) == 0  # 0.48 → 0


@given(
    amount=amounts,
    rate=bps,
    cuts=st.lists(st.floats(min_value=0.01, max_value=1.0), min_size=1, max_size=6),
)
def test_refunds_in_any_slices_give_back_exactly_the_commission_charged(
    amount: int, rate: int, cuts: list[float]
) -> None:
    refunded = taken_back = 0
    for cut in cuts:
        room = amount - refunded
        if room == 0:
            break
        refund = max(1, min(room, int(room * cut)))
        back = ledger.commission_back(refund, rate, amount, refunded, taken_back)
        assert 0 <= back <= ledger.commission_of(amount, rate) - taken_back
        assert sum(dict(ledger.refund_lines("sandbox", "op", refund, back)).values()) == 0
        refunded += refund
        taken_back += back
    last = amount - refunded
    if last:
        taken_back += ledger.commission_back(last, rate, amount, refunded, taken_back)
    # fully refunded: the city keeps nothing of this charge
    assert taken_back == ledger.commission_of(amount, rate)


def test_zero_lines_are_dropped_and_unbalanced_journals_refused() -> None:
    with pytest.raises(ledger.UnbalancedJournal):
        ledger.post(
            None,  # type: ignore[arg-type]  # refused before any database work
            kind="x",
            ref_type="t",
            ref_id="1",
            at=datetime.now(UTC),
            lines=[("a", 1), ("b", 0)],
        )
