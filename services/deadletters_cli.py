"""`citypark deadletters ...`: what the city set aside (dead letters of every consumer, billing's
parked charges, refunds and notifications), and replay once the cause is fixed."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table

from shared.logging import configure_logging
from shared.runtime import Runtime
from shared.settings import Settings, get_settings

app = typer.Typer(help="Dead letters and parked money work: list and replay.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


def _runtime() -> Runtime:
    try:
        settings: Settings = get_settings()
    except Exception as exc:
        err.print(f"[red]Configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc
    configure_logging("WARNING", json=settings.log_json)
    return Runtime(settings, source="ops")


@app.command("list")
def list_command(
    consumer: Annotated[str | None, typer.Option(help="Only this consumer's.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Include those already replayed.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 100,
) -> None:
    """Dead letters (open ones unless --all) and parked charges, refunds and notifications."""
    from services.billing.stuck import service as stuck
    from shared.bus import deadletters

    rt = _runtime()
    with rt.read_sessionmaker() as db:
        rows = deadletters.listing(db, consumer=consumer, include_replayed=all_, limit=limit)
        parked = stuck.parked(db, limit)
    table = Table(title=f"Dead letters ({len(rows)})")
    for column in ("id", "consumer", "topic", "reason", "at", "replayed", "error"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            str(r.id),
            r.consumer,
            r.topic,
            r.reason,
            r.at.isoformat(timespec="seconds"),
            r.replayed_at.isoformat(timespec="seconds") if r.replayed_at else "",
            r.error[:80],
        )
    console.print(table)
    table = Table(title=f"Parked money work ({len(parked.items)})")
    for column in ("kind", "id", "detail", "attempts"):
        table.add_column(column)
    for item in parked.items:
        table.add_row(item.kind.value, item.id, item.detail, str(item.attempts))
    console.print(table)
    backlog = ", ".join(f"{k} {v}" for k, v in parked.due_backlog.items())
    console.print(f"{len(rows)} dead letters, {len(parked.items)} parked; due now: {backlog}")


@app.command("replay")
def replay_command(
    dead_letter_id: Annotated[int | None, typer.Argument(help="The dead letter to replay.")] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="Every open dead letter and every parked item.")
    ] = False,
    consumer: Annotated[str | None, typer.Option(help="With --all: only this consumer's.")] = None,
) -> None:
    """Publish a dead letter's event again (only the consumer that set it aside applies it),
    or with --all every open one, and put every parked charge, refund and notification back."""
    from services.billing.stuck import service as stuck
    from shared.bus import deadletters
    from shared.errors import Problem

    if (dead_letter_id is None) == (not all_):
        err.print("Give a dead letter id, or --all.")
        raise typer.Exit(2)
    rt = _runtime()
    try:
        if dead_letter_id is not None:
            row = deadletters.replay(rt.sessionmaker, rt.bus, dead_letter_id)
            console.print(f"replayed dead letter {row.id} ({row.event_id}) to {row.topic}")
            return
        with rt.read_sessionmaker() as db:
            open_ = deadletters.listing(db, consumer=consumer, limit=100_000)
        replayed = skipped = 0
        for row in track(open_, description="replaying", console=err):
            if row.reason == "undecodable":
                skipped += 1
                continue
            deadletters.replay(rt.sessionmaker, rt.bus, row.id)
            replayed += 1
        with rt.sessionmaker() as db, db.begin():
            parked = stuck.replay_all(db)
    except Problem as exc:
        err.print(f"[red]{exc.code}:[/red] {exc.detail}")
        raise typer.Exit(1) from exc
    finally:
        rt.bus.close()
    console.print(
        f"replayed {replayed} dead letters ({skipped} undecodable kept), "
        f"{parked} parked items back in their queues"
    )
