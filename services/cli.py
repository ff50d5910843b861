"""`citypark`: start any part of the city, migrate, mint admin tokens, simulate traffic."""

from __future__ import annotations

import signal
import socket
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from rich.console import Console
from sqlalchemy.orm import Session, sessionmaker

from services.deadletters_cli import app as deadletters_app
from services.gateway.gate.cli import app as gate_app
from services.keys_cli import app as keys_app
from shared.auth import Role
from shared.logging import configure_logging
from shared.settings import Settings, get_settings

app = typer.Typer(help="CityPark — city-wide parking payments.", no_args_is_help=True)
admin_app = typer.Typer(help="Operations for city ops.", no_args_is_help=True)
app.add_typer(admin_app, name="admin")
ledger_app = typer.Typer(help="The double-entry ledger.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
districts_app = typer.Typer(help="District platforms: backfill.", no_args_is_help=True)
app.add_typer(districts_app, name="districts")
app.add_typer(gate_app, name="gate")
app.add_typer(deadletters_app, name="deadletters")
app.add_typer(keys_app, name="keys")
privacy_app = typer.Typer(help="Personal data: retention.", no_args_is_help=True)
app.add_typer(privacy_app, name="privacy")
console = Console(stderr=True)


class PartName(StrEnum):
    all = "all"
    gateway = "gateway"
    lots = "lots"
    sessions = "sessions"
    billing = "billing"
    paysandbox = "paysandbox"
    vehicleregistry = "vehicleregistry"
    district = "district"


DEFAULT_PORTS = {
    "gateway": 8000,
    "all": 8000,
    "paysandbox": 8090,
    "vehicleregistry": 8091,
    "lots": 8001,
    "sessions": 8002,
    "billing": 8003,
}


def _settings() -> Settings:
    try:
        settings = get_settings()
    except Exception as exc:  # pydantic says which variable is missing; say it plainly
        console.print(f"[red]Configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc
    configure_logging(settings.log_level, json=settings.log_json)
    return settings


def _exit_zero_on_sigterm() -> None:
    # uvicorn re-raises the signal it stopped for once it is done: without a handler of ours,
    # the default one would end a clean stop with "killed by SIGTERM".
    def stopped(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stopped)


def _serve(application: object, host: str, port: int) -> None:
    from shared.shutdown import HTTP_DRAIN_S, Shutdown, arm_hard_exit, exit_now

    workers: Shutdown | None = getattr(getattr(application, "state", None), "shutdown", None)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # Workers stop now, while requests drain, under one deadline; whatever is still
            # stuck at the end does not keep the process alive.
            arm_hard_exit()
            if workers is not None:
                workers.begin(requests_in_flight=len(self.server_state.tasks))
            await super().shutdown(sockets)
            exit_now()  # requests drained, workers joined, the line logged: nothing is left

    _exit_zero_on_sigterm()
    config = uvicorn.Config(
        application,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=HTTP_DRAIN_S,
        # The peer is the socket's: only the gateway's proven header names another (forwarding).
        proxy_headers=False,
    )
    Server(config).run()


def _run_district(settings: Settings, code: str, metrics_port: int | None = None) -> None:
    from services.lots.districts import adapter
    from shared.runtime import Runtime
    from shared.shutdown import Shutdown, arm_hard_exit, exit_now, log_stopped, start_workers

    rt = Runtime(settings, source=f"district-{code}")
    if metrics_port:  # the adapter has no HTTP API; Prometheus scrapes this port
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=settings.host)
    signals: list[int] = []  # the handler only notes the signal; the main thread acts on it
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: signals.append(signum))
    shutdown = Shutdown()
    threads = start_workers(adapter.workers(rt, code), shutdown.stop)
    console.print(f"district adapter [bold]{code}[/bold] running (Ctrl-C stops)")
    while not signals:
        time.sleep(0.2)
    arm_hard_exit()
    stopped, running = shutdown.join(threads)
    log_stopped(shutdown, stopped, running, district=code)
    exit_now()


@app.command()
def run(
    part: Annotated[PartName, typer.Argument(help="Which part of the city to start.")],
    district: Annotated[str | None, typer.Argument(help="District code, for `district`.")] = None,
    host: Annotated[str | None, typer.Option(help="Listen address.")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port.")] = None,
    demo: Annotated[
        bool, typer.Option(help="`all` only: seed demo car parks and simulate traffic.")
    ] = False,
) -> None:
    """Start a part: `all` (the whole city in one process), a service, or a district adapter."""
    settings = _settings()
    from services import city

    if part is PartName.district:
        if not district:
            console.print("[red]Name the district, e.g. `citypark run district gusu`[/red]")
            raise typer.Exit(2)
        _run_district(settings, district, port)
        return
    listen_host = host or settings.host
    listen_port = port or (
        settings.port if part in (PartName.all, PartName.gateway) else DEFAULT_PORTS[part.value]
    )
    if part is PartName.all:
        application, rt = city.embedded(settings)
        if demo:
            from services import demo as demo_mod

            demo_mod.attach_demo(application, rt, f"http://127.0.0.1:{listen_port}")
        console.print(f"CityPark on http://{listen_host}:{listen_port}  (API docs: /docs)")
    else:
        application = city.single(settings, part.value)
        console.print(f"CityPark {part.value} on http://{listen_host}:{listen_port}")
    _serve(application, listen_host, listen_port)


@app.command()
def migrate() -> None:
    """Bring every service's tables up to date (idempotent)."""
    settings = _settings()
    from services import city

    city.migrate(settings)
    console.print("[green]database is up to date[/green]")


@admin_app.command("token")
def admin_token(
    role: Annotated[Role, typer.Option(help="admin, finance or viewer.")] = Role.admin,
    ttl: Annotated[
        str | None,
        typer.Option(help="Lifetime: 30m, 8h, 7d (default: CITYPARK_ADMIN_TOKEN_TTL_S, 8h)."),
    ] = None,
    name: Annotated[str, typer.Option(help="Who holds the token.")] = "",
    note: Annotated[str, typer.Option(help="What the token is for.")] = "",
) -> None:
    """Print a new admin token, once (only its id and hash are stored). Revoke it by its id
    with `citypark admin revoke`."""
    settings = _settings()
    from services.gateway.tokens import service as tokens
    from shared.db import transaction

    try:
        ttl_s = tokens.parse_ttl(ttl) if ttl else settings.admin_token_ttl_s
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    with transaction(_gateway_db(settings)) as db:
        issued = tokens.issue(
            db, settings.jwt_secret.get_secret_value(), role, ttl_s=ttl_s, name=name, note=note
        )
    console.print(f"token id {issued.jti}, {role.value}, expires {issued.expires_at.isoformat()}")
    print(issued.token)  # noqa: T201 - the token is the command's output


@admin_app.command("revoke")
def admin_revoke(
    jti: Annotated[str, typer.Argument(help="The token's id (`GET /v1/admin/tokens`).")],
    reason: Annotated[str | None, typer.Option(help="Why, for the audit log.")] = None,
) -> None:
    """Revoke an admin token: every service refuses it within seconds."""
    settings = _settings()
    from services.gateway.tokens import service as tokens
    from shared.db import transaction
    from shared.errors import Problem

    try:
        with transaction(_gateway_db(settings)) as db:
            row = tokens.revoke(db, jti, tokens.CLI_ACTOR, reason=reason)
            revoked_at = row.revoked_at
    except Problem as exc:
        console.print(f"[red]{exc.code}:[/red] {exc.detail}")
        raise typer.Exit(1) from exc
    console.print(f"revoked {jti} at {revoked_at.isoformat() if revoked_at else '?'}")


def _gateway_db(settings: Settings) -> sessionmaker[Session]:
    """The gateway's tables, migrated (the first token may come before the first start)."""
    from services import city
    from shared.db import make_engine, make_sessionmaker

    city.migrate(settings, [city.PARTS["gateway"]])
    return make_sessionmaker(make_engine(settings.database_url))


@ledger_app.command("check")
def ledger_check() -> None:
    """Prove every journal balances, the whole ledger sums to zero, and every captured charge
    and refund is paid by exactly one settlement or still awaits its run (exit 1 if not)."""
    settings = _settings()
    import json

    from services.billing.ledger import inclusion
    from services.billing.ledger import service as ledger
    from shared.db import make_engine, make_sessionmaker

    engine = make_engine(settings.database_url)
    if engine.dialect.name == "postgresql":  # one snapshot, even while a settlement runs
        engine = engine.execution_options(isolation_level="REPEATABLE READ")
    factory = make_sessionmaker(engine)
    with factory() as db:
        balanced, total, journals, unbalanced = ledger.check(db)
        coverage = inclusion.check_settlements(db)
    report = {
        "balanced": balanced,
        "sum_fen": total,
        "journals": journals,
        "unbalanced_journals": unbalanced,
        "settlements": coverage.report(),
    }
    print(json.dumps(report))  # noqa: T201 - the report is the command's output
    for problem in coverage.problems:
        console.print(f"[red]settlement:[/red] {problem}")
    if not balanced or not coverage.ok:
        raise typer.Exit(1)


@app.command()
def simulate(
    lots: Annotated[int, typer.Option(min=1, help="How many car parks report traffic.")] = 4,
    rate: Annotated[
        float, typer.Option(min=0.01, help="Parkings per second at an average hour of the day.")
    ] = 5.0,
    duration: Annotated[float, typer.Option(min=1, help="Seconds of traffic.")] = 60.0,
    district: Annotated[
        str | None, typer.Option(help="Only car parks of this district (e.g. gusu).")
    ] = None,
    base_url: Annotated[str, typer.Option(help="Gateway URL.")] = "http://127.0.0.1:8000",
    keys_dir: Annotated[
        str, typer.Option(help="Where the demo lots' keys are (`make run` writes them).")
    ] = ".local/demo-keys",
    enrolled: Annotated[float, typer.Option(help="Share of enrolled drivers.")] = 0.5,
    invalid: Annotated[float, typer.Option(help="Share of unreadable plates.")] = 0.02,
    duplicates: Annotated[float, typer.Option(help="Share of entries delivered twice.")] = 0.03,
) -> None:
    """Drive realistic lot traffic through the connector SDK against a running city.

    Arrivals follow the hour of day, stays last minutes to days; a live line shows progress
    and a summary follows. Each car park keeps its SDK outbox under `<keys-dir>/outbox`."""
    _settings()
    from services import demo as demo_mod

    try:
        demo_mod.simulate_cli(
            base_url,
            keys_dir,
            lots=lots,
            rate=rate,
            duration=duration,
            district=district,
            enrolled_share=enrolled,
            invalid_share=invalid,
            duplicate_share=duplicates,
            console=console,
        )
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc


class BackfillDialect(StrEnum):
    canonical = "canonical"
    legacy_json = "legacy-json"
    xml = "xml"
    csv = "csv"


@districts_app.command("import")
def districts_import(
    district: Annotated[str, typer.Option(help="District code, e.g. wujiang.")],
    dialect: Annotated[BackfillDialect, typer.Option(help="The file's dialect.")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Records to replay.")],
    chunk: Annotated[int, typer.Option(min=1, max=1000, help="Records per batch.")] = 500,
) -> None:
    """Replay a district's historical records through the same path as its pushes; re-running
    it changes nothing (every record then comes back as a duplicate)."""
    settings = _settings()
    from rich.progress import Progress
    from sqlalchemy import select

    from services.gateway.districts import backfill
    from services.lots.districts import adapter
    from shared.bus.models import InboxRow
    from shared.errors import Problem
    from shared.runtime import Runtime

    rt = Runtime(settings, source="gateway")
    group = adapter.group_of(district)

    def taken_by_adapter(event_ids: list[str]) -> set[str]:
        # The adapter's inbox remembers for good what the gateway's Redis forgets after weeks.
        with rt.sessionmaker() as db:
            rows = db.scalars(
                select(InboxRow.event_id).where(
                    InboxRow.consumer == group, InboxRow.event_id.in_(event_ids)
                )
            )
            return set(rows)

    try:
        parsed = backfill.read(dialect.value, file.read_bytes())
        with Progress(console=console) as progress:
            task = progress.add_task(f"{district} <- {file.name}", total=parsed.total)
            summary = backfill.replay(
                rt,
                district,
                parsed,
                chunk=chunk,
                already_seen=taken_by_adapter,
                on_chunk=lambda out: progress.advance(task, out.received),
            )
    except Problem as exc:
        console.print(f"[red]{exc.code}:[/red] {exc.detail}")
        raise typer.Exit(1) from exc
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary.reasons.items())) or "none"
    console.print(
        f"{summary.total} records: [green]{summary.accepted} accepted[/green], "
        f"{summary.duplicates} duplicate, [red]{summary.rejected} rejected[/red] ({reasons})"
    )


@privacy_app.command("purge")
def privacy_purge(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what is past its period; change nothing.")
    ] = False,
) -> None:
    """Purge (or pseudonymise) what is past its retention period, in every service's tables,
    now; the services also do it on their own every CITYPARK_RETENTION_INTERVAL_S."""
    from services import city
    from services.billing import retention as billing_retention
    from services.sessions import retention as sessions_retention
    from shared.runtime import Runtime

    settings = _settings()
    city.migrate(settings)
    rt = Runtime(settings, source="cli")
    verb = "due" if dry_run else "purged"
    purges = (("billing", billing_retention.purge), ("sessions", sessions_retention.purge))
    for name, purge in purges:
        typer.echo(f"{name}: purging…" if not dry_run else f"{name}: counting…")
        counts = purge(rt, dry_run=dry_run)
        shown = ", ".join(f"{k} {v}" for k, v in counts.items()) or "nothing"
        typer.echo(f"{name}: {verb} {shown}")


if __name__ == "__main__":
    app()
