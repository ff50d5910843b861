"""`citypark`: start any part of the city, migrate, mint admin tokens, simulate traffic."""

from __future__ import annotations

import signal
import threading
from enum import StrEnum
from typing import Annotated

import typer
import uvicorn
from rich.console import Console

from shared.auth import Role
from shared.logging import configure_logging
from shared.settings import Settings, get_settings

app = typer.Typer(help="CityPark — city-wide parking payments.", no_args_is_help=True)
admin_app = typer.Typer(help="Operations for city ops.", no_args_is_help=True)
app.add_typer(admin_app, name="admin")
console = Console(stderr=True)


class PartName(StrEnum):
    all = "all"
    gateway = "gateway"
    lots = "lots"
    sessions = "sessions"
    billing = "billing"
    paysandbox = "paysandbox"
    district = "district"


DEFAULT_PORTS = {
    "gateway": 8000,
    "all": 8000,
    "paysandbox": 8090,
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


def _serve(application: object, host: str, port: int) -> None:
    uvicorn.run(
        application,
        host=host,
        port=port,
        log_level="warning",  # type: ignore[arg-type]
        timeout_graceful_shutdown=10,
    )


def _run_district(settings: Settings, code: str) -> None:
    from services.lots.districts import adapter
    from shared.runtime import Runtime

    rt = Runtime(settings, source=f"district-{code}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    threads = [threading.Thread(target=w, args=(stop,)) for w in adapter.workers(rt, code)]
    for t in threads:
        t.start()
    console.print(f"district adapter [bold]{code}[/bold] running (Ctrl-C stops)")
    while not stop.wait(0.5):
        pass
    for t in threads:
        t.join(timeout=15)


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
        _run_district(settings, district)
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
    note: Annotated[str, typer.Option(help="Who or what the token is for.")] = "",
) -> None:
    """Print a new admin token (only its hash is stored)."""
    settings = _settings()
    from services import city
    from services.gateway import admin_tokens
    from shared.db import make_engine, make_sessionmaker, transaction

    city.migrate(settings, [city.PARTS["gateway"]])
    factory = make_sessionmaker(make_engine(settings.database_url))
    with transaction(factory) as db:
        token = admin_tokens.create(db, settings.jwt_secret.get_secret_value(), role, note)
    print(token)  # noqa: T201 - the token is the command's output


@app.command()
def simulate(
    base_url: Annotated[str, typer.Option(help="Gateway URL.")] = "http://127.0.0.1:8000",
    keys_dir: Annotated[
        str, typer.Option(help="Where the demo lots' keys are.")
    ] = ".local/demo-keys",
    parkings: Annotated[int, typer.Option(help="How many parkings to drive.")] = 50,
    rate: Annotated[float, typer.Option(help="Parkings started per second.")] = 5.0,
) -> None:
    """Drive lot traffic through the connector SDK (entries, then exits) against a gateway."""
    _settings()
    from services import demo as demo_mod

    demo_mod.simulate_cli(base_url, keys_dir, parkings, rate)


if __name__ == "__main__":
    app()
