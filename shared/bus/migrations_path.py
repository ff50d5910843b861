from pathlib import Path

BUS_MIGRATIONS = Path(__file__).parent / "migrations"
