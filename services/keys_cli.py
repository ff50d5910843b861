"""`citypark keys`: data keys of phones and plates at rest (docs/privacy.md, "At rest")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from sqlalchemy import Engine

from shared import pii
from shared.pii_columns import PiiTable, convert_table, count_rows, pii_tables
from shared.settings import Settings

app = typer.Typer(help="Data keys of personal data at rest.", no_args_is_help=True)
console = Console(stderr=True)


def encrypted_tables() -> list[PiiTable]:
    """Every table holding encrypted phones or plates, from the models of every part."""
    from services.billing.db import Base as Billing
    from services.lots.models import Base as Lots
    from services.sessions.models import Base as Sessions

    return [t for base in (Lots, Sessions, Billing) for t in pii_tables(base.metadata)]


@dataclass
class Rotated:
    table: str
    rows: int  # rows read
    changed: int  # rows re-encrypted and/or re-indexed (or that would be, dry run)


def rotate_data(
    engine: Engine,
    settings: Settings,
    *,
    reindex: bool = False,
    dry_run: bool = False,
    batch_size: int = 500,
    on_table: Callable[[PiiTable, int], Callable[[int], None]] | None = None,
) -> list[Rotated]:
    """Re-encrypt every value not under the current data key (or still in clear) and, with
    `reindex`, recompute every blind index under the current index key. Batches commit one by
    one; a row changed meanwhile by a service is left as that service wrote it (it is already
    under the current keys). Running it again changes nothing."""
    current = pii.current_key_id(settings)

    def stale(value: str | None) -> bool:
        return value is not None and (
            not pii.is_encrypted(value) or pii.key_id_of(value) != current
        )

    def again(value: str) -> str:
        return pii.encrypt(settings, pii.reveal(settings, value))

    report = []
    for t in encrypted_tables():
        with engine.connect() as conn:
            rows = count_rows(conn, t)
        advance = on_table(t, rows) if on_table else None
        changed = convert_table(
            engine.begin,
            t,
            settings=settings,
            value=again,
            reindex=reindex,
            needs=stale,
            batch_size=batch_size,
            dry_run=dry_run,
            progress=advance,
        )
        report.append(Rotated(t.name, rows, changed))
    return report


@app.command("rotate-data")
def rotate_data_command(
    reindex: Annotated[
        bool,
        typer.Option(
            help="Also recompute the blind indexes (after `data_index_key` changed; run it in "
            "a maintenance window, services stopped: see docs/privacy.md)."
        ),
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Count what would change; change nothing.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000)] = 500,
) -> None:
    """Re-encrypt phones and plates at rest under the current `data_key_id` (values under an
    older key or still in clear), table by table, in batches each in its own transaction."""
    from services.cli import _settings
    from shared.db import make_engine
    from shared.pii_columns import bind_data_keys

    settings = _settings()
    engine = bind_data_keys(make_engine(settings.database_url), settings)
    try:
        with Progress(console=console) as progress:

            def on_table(t: PiiTable, rows: int) -> Callable[[int], None]:
                task = progress.add_task(t.name, total=rows)
                return lambda n: progress.advance(task, n)

            report = rotate_data(
                engine,
                settings,
                reindex=reindex,
                dry_run=dry_run,
                batch_size=batch_size,
                on_table=on_table,
            )
    except pii.DataKeyUnknown as exc:
        console.print(f"[red]data_key_unknown:[/red] {exc} (add that key to data_keys)")
        raise typer.Exit(1) from exc
    finally:
        engine.dispose()
    verb = "would change" if dry_run else "changed"
    for r in report:
        console.print(f"{r.table}: {r.rows} rows, {r.changed} {verb}")
    total = sum(r.changed for r in report)
    key = pii.current_key_id(settings)
    console.print(f"{total} rows {verb}; data key {key!r}{', re-indexed' if reindex else ''}")
