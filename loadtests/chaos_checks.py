"""The chaos run's verdict: invariants read straight from the databases with SQL, each with its
figures and, when it fails, the ids to look up in the parts' logs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, text

from loadtests.chaos_traffic import Lot, Outcome, Parking

TERMINAL = ("captured", "declined", "free")
SAMPLE = 10  # ids listed per failure, enough to start from
DUE_GRACE = timedelta(seconds=15)  # a worker's poll and backoff jitter, not a stuck row


@dataclass
class Check:
    name: str
    ok: bool
    figures: dict[str, Any]
    detail: str = ""


@dataclass(frozen=True)
class Poison:
    """A message injected on purpose; the consumer groups expected to dead-letter it."""

    marker: str
    kind: str
    topic: str
    groups: tuple[str, ...]


@dataclass
class Expectations:
    lots: list[Lot]
    parkings: list[Parking]
    outcomes: list[Outcome]
    poison: list[Poison] = field(default_factory=list)


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _exits(engine: Engine, exp: Expectations) -> Check:
    """Every exit the gates sent closed exactly one session, the one of its entry."""
    with engine.connect() as c:
        rows = c.execute(
            text("SELECT id, entry_event_id, exit_event_id, status FROM sessions_session")
        ).all()
        unmatched = [r[0] for r in c.execute(text("SELECT event_id FROM sessions_unmatched_exit"))]
    by_exit = Counter(r.exit_event_id for r in rows if r.exit_event_id)
    by_entry = {r.entry_event_id: r for r in rows}
    statuses = Counter(r.status for r in rows)
    missing, wrong_pair, twice = [], [], []
    for p in exp.parkings:
        lot = exp.lots[p.lot].lot_id
        exit_key, entry_key = f"{lot}/{p.exit_id}", f"{lot}/{p.entry_id}"
        if by_exit[exit_key] > 1:
            twice.append(exit_key)
        session = by_entry.get(entry_key)
        if session is None or session.exit_event_id is None:
            missing.append(exit_key)
        elif session.exit_event_id != exit_key or session.status != "closed":
            wrong_pair.append(f"{entry_key} closed by {session.exit_event_id} ({session.status})")
    rejected = sum(o.rejected is not None for o in exp.outcomes)
    ok = (
        not (missing or wrong_pair or twice or unmatched or rejected)
        and statuses.get("abandoned", 0) == 0
        and statuses.get("open", 0) == 0
        and len(rows) == len(exp.parkings)
    )
    return Check(
        "every exit closed exactly one session",
        ok,
        {
            "exits_sent": len(exp.parkings),
            "sessions": len(rows),
            "sessions_by_status": dict(statuses),
            "exits_without_their_session_closed": len(missing),
            "exits_closing_another_session": len(wrong_pair),
            "exits_closing_more_than_one": len(twice),
            "unmatched_exits_left": len(unmatched),
            "events_rejected_by_the_city": rejected,
        },
        "; ".join(
            f"{what}: {ids[:SAMPLE]}"
            for what, ids in (
                ("exit (lot/event) whose session is not closed", missing),
                ("closed by the wrong exit", wrong_pair),
                ("exit closing several sessions", twice),
                ("unmatched exits", unmatched),
            )
            if ids
        ),
    )


def _charges(engine: Engine) -> Check:
    """Every closed post-pay session has exactly one charge, and it is settled; no other
    session has one."""
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT s.id, s.decision, s.status, count(ch.id) AS n, "
                "min(ch.status) AS st, max(ch.status) AS st2 "
                "FROM sessions_session s LEFT JOIN billing_charge ch ON ch.session_id = s.id "
                "GROUP BY s.id, s.decision, s.status"
            )
        ).all()
        orphans = [
            r[0]
            for r in c.execute(
                text(
                    "SELECT ch.id FROM billing_charge ch "
                    "LEFT JOIN sessions_session s ON s.id = ch.session_id WHERE s.id IS NULL"
                )
            )
        ]
        by_status: dict[str, int] = dict(
            c.execute(text("SELECT status, count(*) FROM billing_charge GROUP BY status")).all()
        )
    postpay = [r for r in rows if r.decision == "postpay" and r.status == "closed"]
    none = [r.id for r in postpay if r.n == 0]
    several = [r.id for r in postpay if r.n > 1]
    unsettled = [r.id for r in postpay if r.n == 1 and r.st not in TERMINAL]
    charged_not_postpay = [r.id for r in rows if r.n and r.decision != "postpay"]
    ok = not (none or several or unsettled or charged_not_postpay or orphans)
    return Check(
        "every post-pay session has exactly one terminal charge",
        ok,
        {
            "postpay_sessions": len(postpay),
            "charges_by_status": by_status,
            "postpay_sessions_without_charge": len(none),
            "postpay_sessions_with_several": len(several),
            "postpay_sessions_charge_not_terminal": len(unsettled),
            "charges_of_non_postpay_sessions": len(charged_not_postpay),
            "charges_without_session": len(orphans),
        },
        "; ".join(
            f"{what}: {ids[:SAMPLE]}"
            for what, ids in (
                ("post-pay session without charge", none),
                ("session with several charges", several),
                ("session whose charge is not settled", unsettled),
                ("charged session that was not post-pay", charged_not_postpay),
                ("charge without session", orphans),
            )
            if ids
        ),
    )


def _money(engine: Engine) -> Check:
    """The provider's captures, billing's captured charges and the ledger's capture journals
    are the same charges and the same money."""
    with engine.connect() as c:
        sandbox: dict[str, int] = dict(
            c.execute(
                text(
                    "SELECT out_trade_no, amount_fen FROM paysandbox_charge WHERE status='captured'"
                )
            ).all()
        )
        billing: dict[str, int] = dict(
            c.execute(
                text("SELECT id, amount_fen FROM billing_charge WHERE status = 'captured'")
            ).all()
        )
        ledger: dict[str, int] = dict(
            c.execute(
                text(
                    "SELECT j.ref_id, sum(e.amount_fen) FROM billing_journal j "
                    "JOIN billing_ledger_entry e ON e.journal_id = j.id "
                    "WHERE j.kind = 'charge_captured' "
                    "AND e.account LIKE 'asset:provider_clearing:%' GROUP BY j.ref_id"
                )
            ).all()
        )
    figures = {
        "sandbox_captures": len(sandbox),
        "sandbox_captured_fen": sum(sandbox.values()),
        "billing_captured": len(billing),
        "billing_captured_fen": sum(billing.values()),
        "ledger_capture_journals": len(ledger),
        "ledger_clearing_debits_fen": int(sum(ledger.values())),
    }
    only_sandbox = sorted(set(sandbox) - set(billing))
    only_billing = sorted(set(billing) - set(sandbox))
    not_booked = sorted(set(billing) - set(ledger))
    booked_not_captured = sorted(set(ledger) - set(billing))
    amounts = sorted(
        k for k in set(sandbox) & set(billing) & set(ledger)
        if not sandbox[k] == billing[k] == ledger[k]
    )  # fmt: skip
    problems = (
        ("captured at the provider, not in billing (out_trade_no)", only_sandbox),
        ("captured in billing, not at the provider", only_billing),
        ("captured, no ledger journal", not_booked),
        ("ledger journal of a charge not captured", booked_not_captured),
        ("amounts differ", amounts),
    )
    return Check(
        "the provider's captures = billing's captured charges = the ledger (count and sum)",
        not any(ids for _, ids in problems),
        figures,
        "; ".join(f"{what}: {ids[:SAMPLE]}" for what, ids in problems if ids),
    )


def _ledger(engine: Engine) -> Check:
    with engine.connect() as c:
        total = c.scalar(text("SELECT coalesce(sum(amount_fen), 0) FROM billing_ledger_entry"))
        journals = c.scalar(text("SELECT count(*) FROM billing_journal"))
        unbalanced = list(
            c.scalars(
                text(
                    "SELECT journal_id FROM billing_ledger_entry GROUP BY journal_id "
                    "HAVING sum(amount_fen) <> 0"
                )
            )
        )
        empty = list(
            c.scalars(
                text(
                    "SELECT j.id FROM billing_journal j LEFT JOIN billing_ledger_entry e "
                    "ON e.journal_id = j.id WHERE e.id IS NULL"
                )
            )
        )
    return Check(
        "the ledger balances",
        total == 0 and not unbalanced and not empty,
        {
            "journals": journals,
            "sum_fen": int(total or 0),
            "unbalanced_journals": len(unbalanced),
            "journals_without_entries": len(empty),
        },
        f"unbalanced journals: {unbalanced[:SAMPLE]}" if unbalanced else "",
    )


def _stuck(engine: Engine, sdk_pending: int) -> Check:
    """Nothing waits that should have happened by now."""
    now = datetime.now(UTC)
    with engine.connect() as c:
        open_charges = list(
            c.execute(
                text(
                    "SELECT id, status, attempts, failure_code FROM billing_charge "
                    "WHERE status IN ('pending', 'unknown')"
                )
            )
        )
        outbox: dict[str, int] = dict(
            c.execute(
                text(
                    "SELECT source, count(*) FROM bus_log WHERE relayed_at IS NULL GROUP BY source"
                )
            ).all()
        )
        deliveries = c.execute(
            text(
                "SELECT id, status, next_attempt_at FROM billing_notification_delivery "
                "WHERE status <> 'delivered'"
            )
        ).all()
        sandbox_notices = c.execute(
            text(
                "SELECT notify_id, next_attempt_at FROM paysandbox_notification "
                "WHERE delivered_at IS NULL"
            )
        ).all()
        refunds = c.scalar(
            text("SELECT count(*) FROM billing_refund WHERE status IN ('pending', 'unknown')")
        )
    overdue = [d.id for d in deliveries if _aware(d.next_attempt_at) < now - DUE_GRACE]
    failed = [d.id for d in deliveries if d.status == "failed"]
    overdue_notices = [
        n.notify_id for n in sandbox_notices if _aware(n.next_attempt_at) < now - DUE_GRACE
    ]
    figures = {
        "charges_pending_or_unknown": len(open_charges),
        "refunds_pending_or_unknown": int(refunds or 0),
        "outbox_rows_not_relayed": sum(outbox.values()),
        "outbox_rows_not_relayed_by_source": outbox,
        "driver_notifications_overdue": len(overdue),
        "driver_notifications_given_up": len(failed),
        "driver_notifications_not_yet_due": len(deliveries) - len(overdue),
        "provider_notices_overdue": len(overdue_notices),
        "provider_notices_not_yet_due": len(sandbox_notices) - len(overdue_notices),
        "gate_events_still_in_sdk_outboxes": sdk_pending,
    }
    ok = not (open_charges or outbox or overdue or failed or overdue_notices or refunds) and (
        sdk_pending == 0
    )
    return Check(
        "nothing is stuck",
        ok,
        figures,
        "; ".join(
            f"{what}: {ids[:SAMPLE]}"
            for what, ids in (
                (
                    "charges pending/unknown (id, status, attempts, failure)",
                    [tuple(r) for r in open_charges],
                ),
                ("driver notification deliveries overdue", overdue),
                ("driver notification deliveries given up", failed),
                ("provider notices overdue (notify_id)", overdue_notices),
            )
            if ids
        ),
    )


def _dead_letters(engine: Engine, poison: list[Poison]) -> Check:
    """Exactly the injected poison is dead-lettered: by each consumer group that reads its
    topic, once; and nothing else is."""
    with engine.connect() as c:
        rows = c.execute(
            text("SELECT id, consumer, topic, event_id, payload, error FROM bus_dead_letter")
        ).all()
    found: Counter[tuple[str, str]] = Counter()
    unexpected = []
    for r in rows:
        hit = next(
            (p for p in poison if p.marker in (r.event_id or "") or p.marker in (r.payload or "")),
            None,
        )
        if hit is None:
            unexpected.append(f"{r.consumer} {r.topic} {r.event_id}: {str(r.error)[:160]}")
        else:
            found[(r.consumer, hit.marker)] += 1
    expected = {(g, p.marker) for p in poison for g in p.groups}
    missing = sorted(f"{g} {m}" for g, m in expected - set(found))
    twice = sorted(f"{g} {m} x{n}" for (g, m), n in found.items() if n > 1)
    wrong_group = sorted(f"{g} {m}" for g, m in set(found) - expected)
    return Check(
        "dead letters are exactly the injected poison",
        not (missing or twice or wrong_group or unexpected),
        {
            "poison_injected": len(poison),
            "dead_letters_expected": len(expected),
            "dead_letters": len(rows),
            "expected_missing": len(missing),
            "dead_lettered_more_than_once": len(twice),
            "dead_lettered_by_an_unexpected_group": len(wrong_group),
            "dead_letters_not_injected": len(unexpected),
            "by_consumer": dict(Counter(r.consumer for r in rows)),
        },
        "; ".join(
            f"{what}: {ids[:SAMPLE]}"
            for what, ids in (
                ("missing (group marker)", missing),
                ("repeated", twice),
                ("unexpected group", wrong_group),
                ("not injected (group topic event: error)", unexpected),
            )
            if ids
        ),
    )


def _offline(engine: Engine, exp: Expectations) -> Check:
    """What a gate answered without the city stands: an offline post-pay is recorded post-pay
    (the driver pays afterwards), an offline pay-at-gate is never charged."""
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT s.exit_event_id, s.decision, s.reason, count(ch.id) AS charges "
                "FROM sessions_session s LEFT JOIN billing_charge ch ON ch.session_id = s.id "
                "WHERE s.exit_event_id IS NOT NULL "
                "GROUP BY s.exit_event_id, s.decision, s.reason"
            )
        ).all()
    by_exit = {r.exit_event_id: r for r in rows}
    promised, broken, paid_twice, decided_before, two_gates = 0, [], [], [], []
    at_gate = 0
    for p, out in zip(exp.parkings, exp.outcomes, strict=True):
        if not out.offline:
            continue
        key = f"{exp.lots[p.lot].lot_id}/{p.exit_id}"
        session = by_exit.get(key)
        if session is None:
            continue  # not closed at all: the exits check names it
        if out.decision == "postpay":
            promised += 1
            if session.decision in ("postpay", "free"):
                continue
            if (
                session.reason == "offline_snapshot"
                and out.second_offline
                and out.second_decision == session.decision
            ):  # two controllers answered differently offline; the first to arrive stands
                two_gates.append(f"{p.exit_id} recorded {session.decision} ({session.reason})")
            elif session.reason == "offline_snapshot":  # the city saw the promise, refused it
                broken.append(f"{p.exit_id} recorded {session.decision} ({session.reason})")
            else:  # the slow first send, decided afresh before the replay (sdk/README.md)
                decided_before.append(f"{p.exit_id} recorded {session.decision} ({session.reason})")
        elif out.decision == "pay_on_site":
            at_gate += 1
            if session.charges:
                paid_twice.append(p.exit_id)
    return Check(
        "gate decisions taken offline were honoured",
        not (broken or paid_twice),
        {
            "offline_postpay_exits": promised,
            "offline_postpay_refused_by_the_city": len(broken),
            "offline_postpay_decided_afresh_from_a_late_first_send": len(decided_before),
            "offline_answers_of_two_controllers_differed": len(two_gates),
            "offline_pay_at_gate_exits": at_gate,
            "offline_pay_at_gate_charged": len(paid_twice),
        },
        "; ".join(
            f"{what}: {ids[:SAMPLE]}"
            for what, ids in (
                ("offline post-pay exits (exit event id) the city refused", broken),
                ("decided afresh from the late first send (not failing)", decided_before),
                ("two controllers answered differently, the first stands (not failing)", two_gates),
                ("paid at the gate, charged again (exit event id)", paid_twice),
            )
            if ids
        ),
    )


def run_checks(engine: Engine, exp: Expectations, sdk_pending: int) -> list[Check]:
    return [
        _exits(engine, exp),
        _offline(engine, exp),
        _charges(engine),
        _money(engine),
        _ledger(engine),
        _stuck(engine, sdk_pending),
        _dead_letters(engine, exp.poison),
    ]


def drain_state(engine: Engine, expected_sessions: int) -> dict[str, int]:
    """What is still on its way: the figures the run waits on after the traffic."""
    with engine.connect() as c:
        q = c.execute(
            text(
                "SELECT "
                "(SELECT count(*) FROM sessions_session WHERE status = 'closed') AS closed, "
                "(SELECT count(*) FROM sessions_session s WHERE s.status = 'closed' "
                " AND s.decision = 'postpay' AND NOT EXISTS (SELECT 1 FROM billing_charge ch "
                " WHERE ch.session_id = s.id AND ch.status IN ('captured','declined','free'))) "
                " AS unsettled, "
                "(SELECT count(*) FROM billing_charge WHERE status IN ('pending','unknown')) "
                " AS open_charges, "
                "(SELECT count(*) FROM bus_log WHERE relayed_at IS NULL) AS outbox, "
                "(SELECT count(*) FROM paysandbox_notification WHERE delivered_at IS NULL "
                " AND next_attempt_at < now()) AS notices"
            )
        ).one()
    return {
        "closed": int(q.closed),
        "to_close": max(0, expected_sessions - int(q.closed)),
        "unsettled": int(q.unsettled),
        "open_charges": int(q.open_charges),
        "outbox": int(q.outbox),
        "notices": int(q.notices),
    }


def drained(state: dict[str, int]) -> bool:
    return not (
        state["to_close"]
        or state["unsettled"]
        or state["open_charges"]
        or state["outbox"]
        or state["notices"]
    )
