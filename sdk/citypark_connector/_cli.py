"""`citypark-connector` command line: key generation and the outbox of a car park's connector."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from ._keys import generate_keypair
from ._outbox import EventState, Outbox

app = typer.Typer(help="CityPark connector tools.", no_args_is_help=True)
outbox_app = typer.Typer(help="Inspect the connector's local outbox.", no_args_is_help=True)
app.add_typer(outbox_app, name="outbox")

# The key id becomes a file name, so keep it to characters that are safe on every filesystem.
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@app.callback()
def main() -> None:
    """CityPark connector tools."""


@app.command()
def keygen(
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Where to write the key files.")],
    key_id: Annotated[str, typer.Option("--key-id", help="Key id to register with ops.")],
) -> None:
    """Generate an Ed25519 key pair: `<id>.key` (private, 0600) and `<id>.pub.pem`."""
    if not _KEY_ID.fullmatch(key_id):
        raise typer.BadParameter(
            "use letters, digits, '.', '_' or '-', starting with a letter or digit",
            param_hint="--key-id",
        )
    private_path = out_dir / f"{key_id}.key"
    public_path = out_dir / f"{key_id}.pub.pem"
    for path in (private_path, public_path):
        if path.exists():
            typer.echo(f"{path} already exists; not overwriting a key.", err=True)
            raise typer.Exit(code=1)

    private_pem, public_pem = generate_keypair()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Create the private key file with 0600 from the start: writing first and chmod-ing after
    # would leave it readable to others for a moment.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as private_file:
        private_file.write(private_pem)
    public_path.write_text(public_pem, encoding="ascii")

    typer.echo(f"Private key: {private_path} (keep it on this machine; never send it)")
    typer.echo(f"Public key:  {public_path}")
    typer.echo("")
    typer.echo(public_pem, nl=False)
    typer.echo("")
    typer.echo(
        f"Next: send {public_path.name} and the key id {key_id!r} to CityPark ops to register "
        f"on your lot, then create ConnectorClient({key_id!r}, <contents of {private_path.name}>, "
        "base_url=...)."
    )


OutboxPath = Annotated[
    Path,
    typer.Argument(help="The outbox file (the client's outbox_path).", exists=True, dir_okay=False),
]


@outbox_app.command("list")
def outbox_list(
    path: OutboxPath,
    state: Annotated[
        EventState | None, typer.Option("--state", help="Only pending, delivered or rejected.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="At most this many, newest first.")
    ] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Events in the outbox, newest first, with their state and, if rejected, the problem."""
    outbox = Outbox(path)
    try:
        counts = {s.value: outbox.count(s) for s in EventState}
        events = outbox.list(state, limit)
    finally:
        outbox.close()
    if as_json:
        for e in events:
            typer.echo(
                json.dumps(
                    {
                        "seq": e.seq,
                        "event_id": e.event_id,
                        "kind": e.kind,
                        "state": e.state.value,
                        "attempts": e.attempts,
                        "created_at": _iso(e.created_at),
                        "delivered_at": None if e.delivered_at is None else _iso(e.delivered_at),
                        "body": e.body,
                        "answer": e.answer,
                        "offline_decision": e.offline_decision,
                        "last_error": e.last_error,
                    },
                    ensure_ascii=False,
                )
            )
        return
    typer.echo("  ".join(f"{name}: {n}" for name, n in counts.items()))
    for e in events:
        plate = f"{e.body.get('plate')} {e.body.get('plate_color')}"
        note = ""
        if e.state is EventState.rejected and e.answer:
            note = f"{e.answer.get('code')}: {e.answer.get('detail')}"
        elif e.state is EventState.pending and e.last_error:
            note = f"last error: {e.last_error}"
        elif e.answer and "decision" in e.answer:
            note = f"decision {e.answer['decision']}"
        if e.offline_decision:
            note += f" (decided offline: {e.offline_decision['decision']})"
        typer.echo(
            f"{e.seq:>8}  {_iso(e.created_at)}  {e.kind:<5}  {e.state.value:<9}  "
            f"x{e.attempts:<3} {e.event_id}  {plate}  {note}".rstrip()
        )


@outbox_app.command("retry")
def outbox_retry(
    path: OutboxPath,
    event_ids: Annotated[list[str], typer.Argument(help="Rejected events to send again.")],
) -> None:
    """Put rejected events back in the queue (after fixing what their problem named)."""
    outbox = Outbox(path)
    try:
        n = outbox.requeue(event_ids)
    finally:
        outbox.close()
    typer.echo(f"{n} event(s) queued again; the connector sends them on its next round.")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
