"""`citypark-connector keygen`: the key files an operator hands to ops (SPEC §4)."""

from __future__ import annotations

import stat
from pathlib import Path

from citypark_connector import load_private_key
from citypark_connector._cli import app
from typer.testing import CliRunner

from shared.signatures import load_public_key

runner = CliRunner()


def keygen(out_dir: Path, key_id: str) -> tuple[int, str]:
    result = runner.invoke(app, ["keygen", "--out-dir", str(out_dir), "--key-id", key_id])
    return result.exit_code, result.output


def test_keygen_writes_a_loadable_key_pair(tmp_path: Path) -> None:
    out_dir = tmp_path / "keys" / "lot"

    exit_code, output = keygen(out_dir, "lot-0421-a")

    assert exit_code == 0, output
    private_path, public_path = out_dir / "lot-0421-a.key", out_dir / "lot-0421-a.pub.pem"
    private = load_private_key(private_path.read_text())
    public = load_public_key(public_path.read_text())
    public.verify(private.sign(b"gate 3"), b"gate 3")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert public_path.read_text() in output
    assert "PRIVATE KEY" not in output
    assert "ops" in output


def test_keygen_refuses_to_overwrite_an_existing_key(tmp_path: Path) -> None:
    assert keygen(tmp_path, "lot-0421-a")[0] == 0
    before = (tmp_path / "lot-0421-a.key").read_text()

    exit_code, output = keygen(tmp_path, "lot-0421-a")

    assert exit_code == 1
    assert "already exists" in output
    assert (tmp_path / "lot-0421-a.key").read_text() == before


def test_keygen_rejects_a_key_id_that_is_not_a_plain_file_name(tmp_path: Path) -> None:
    exit_code, output = keygen(tmp_path / "keys", "../escape")

    assert exit_code == 2
    assert "--key-id" in output
    assert not (tmp_path / "escape.key").exists()
    assert not (tmp_path / "keys").exists()


def test_keygen_makes_a_fresh_pair_each_time(tmp_path: Path) -> None:
    assert keygen(tmp_path, "lot-a")[0] == 0
    assert keygen(tmp_path, "lot-b")[0] == 0

    assert (tmp_path / "lot-a.pub.pem").read_text() != (tmp_path / "lot-b.pub.pem").read_text()
