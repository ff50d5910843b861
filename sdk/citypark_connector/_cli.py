"""`citypark-connector` command line: key generation for a car park's connector."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer

from ._keys import generate_keypair

app = typer.Typer(help="CityPark connector tools.", no_args_is_help=True)

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
