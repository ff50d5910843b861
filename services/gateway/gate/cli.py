"""`citypark gate ...`: look after the gateway's Redis state by hand."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from shared.errors import Problem
from shared.logging import configure_logging
from shared.settings import CacheKind, Settings, get_settings

app = typer.Typer(help="The gateway's gate state in Redis.", no_args_is_help=True)
console = Console(stderr=True)


def _settings() -> Settings:
    try:
        settings = get_settings()
    except Exception as exc:  # pydantic says which variable is missing; say it plainly
        console.print(f"[red]Configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc
    # Warnings only: the progress bar and the summary line say what happened.
    configure_logging("WARNING", json=settings.log_json)
    return settings


@app.command("rebuild")
def rebuild_command(
    page_size: int = typer.Option(2000, min=1, max=5000, help="Records per internal call."),
    wait: float = typer.Option(60.0, min=0, help="Seconds to wait for a rebuild already running."),
) -> None:
    """Rebuild the gate state from billing's drivers and the open sessions, in place.

    Safe while the city runs: nothing is cleared first, and account events that arrive
    meanwhile keep their newer versions. Prints one summary line on stdout."""
    from services.gateway.gate import rebuild
    from shared.runtime import Runtime

    settings = _settings()
    if settings.cache is CacheKind.memory:
        console.print(
            "[red]The embedded default keeps the gate state inside the running city, which "
            "rebuilds it by itself; set CITYPARK_CACHE=redis to rebuild a real Redis.[/red]"
        )
        raise typer.Exit(2)
    rt = Runtime(settings, source="gateway")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(phase: str, done: int, total: int | None) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        try:
            result = rebuild.rebuild(rt, progress=progress, wait_s=wait, page_size=page_size)
        except (rebuild.RebuildBusy, rebuild.RebuildSuperseded, Problem) as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from exc
    print(result.summary())  # noqa: T201 - the summary is the command's output


@app.command("status")
def status_command() -> None:
    """Print the marker: when Redis was last found empty and when the state was rebuilt."""
    from services.gateway.gate import rebuild
    from shared.runtime import Runtime

    rt = Runtime(_settings(), source="gateway")
    print(json.dumps(rebuild.marker(rt.redis) or {"marker": "missing"}))  # noqa: T201
