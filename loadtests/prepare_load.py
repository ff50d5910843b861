"""Seed load car parks and drivers into the city `make up` runs, for `make load`."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from loadtests.seed import seed
from shared.runtime import Runtime
from shared.settings import get_settings


def main() -> None:
    rt = Runtime(get_settings(), source="load")
    token = subprocess.run(
        [str(Path(sys.executable).parent / "citypark"), "admin", "token"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    admin = httpx.Client(
        base_url="http://127.0.0.1:8000", timeout=30, headers={"Authorization": f"Bearer {token}"}
    )
    manifest = seed(rt, admin, n_lots=100, n_drivers=500, run_id=uuid.uuid4().hex[:6])
    manifest.save(Path("reports/load-manifest.json"))
    lots, drivers = len(manifest.lots), len(manifest.enrolled_plates)
    print(f"seeded {lots} car parks and {drivers} drivers")


if __name__ == "__main__":
    main()
