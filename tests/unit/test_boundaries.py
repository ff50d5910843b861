"""Services never import each other; shared never imports a service (STYLE §14).

Only the composition root (services/city.py, cli.py, demo.py) sees every part."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMPOSITION = {"city.py", "cli.py", "demo.py", "__init__.py"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_shared_never_imports_services() -> None:
    offenders = [
        (str(p.relative_to(ROOT)), m)
        for p in (ROOT / "shared").rglob("*.py")
        for m in imported_modules(p)
        if m == "services" or m.startswith("services.")
    ]
    assert offenders == []


def test_services_never_import_each_other() -> None:
    offenders = []
    for service_dir in (ROOT / "services").iterdir():
        if not service_dir.is_dir() or service_dir.name.startswith("__"):
            continue
        for p in service_dir.rglob("*.py"):
            for m in imported_modules(p):
                parts = m.split(".")
                if parts[0] == "services" and len(parts) > 1 and parts[1] != service_dir.name:
                    offenders.append((str(p.relative_to(ROOT)), m))
    assert offenders == []


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("from services.billing.charge import service\nimport services.lots\n")
    assert imported_modules(bad) == {"services.billing.charge", "services.lots"}
