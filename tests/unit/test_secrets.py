"""The master secret and the keys derived from it: weak secrets are refused at start-up, each
purpose has its own key, tokens are verified with the key of their kind (and the previous
secret while it is rotated), revocation lists refresh on read, the paysandbox wants its token."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import jwt
import pytest
import yaml
from fastapi import Depends
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError
from structlog.testing import capture_logs

from services.gateway.tokens.service import parse_ttl
from services.paysandbox.auth import require_caller, sandbox_token
from shared.auth import (
    INTERNAL_HEADER,
    ISSUER,
    DriverAuth,
    DriverCutoffs,
    InternalAuth,
    Revocations,
    Role,
    ViewerAuth,
    internal_token,
    issue_admin_token,
    issue_driver_token,
    new_admin_token,
)
from shared.http import make_app
from shared.keys import Purpose, derive, derive_hex
from shared.settings import Settings

MASTER = "unit-master-" + "0123456789abcdef" * 2
PREVIOUS = "unit-previous-" + "fedcba9876543210" * 2


def settings(secret: str = MASTER, **extra: Any) -> Settings:
    return Settings(jwt_secret=SecretStr(secret), _env_file=None, **extra)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "weak",
    [
        "change-me-to-64-hex-chars",  # what deploy/k8s/config.yaml used to ship
        "change-me-to-64-hex-chars-" + "0123456789abcdef",  # long enough, still a placeholder
        "CHANGEME-0123456789abcdef0123456789abcdef",
        "secret-0123456789abcdef0123456789abcdef",
        "test-secret-0123456789abcdef0123456789",
        "example-0123456789abcdef0123456789abcdef",
        "x" * 64,
        "ab" * 32,
        secrets.token_hex(15),  # random but 30 bytes
    ],
)
def test_short_or_placeholder_secrets_are_refused_at_start_up(weak: str) -> None:
    with pytest.raises(ValidationError) as refused:
        settings(weak)
    message = str(refused.value)
    assert "CITYPARK_JWT_SECRET" in message
    assert "openssl rand -hex 32" in message
    assert weak not in message  # a refused secret is not echoed into a log


def test_previous_and_notify_secrets_are_held_to_the_same_rule() -> None:
    with pytest.raises(ValidationError, match="CITYPARK_JWT_SECRET_PREVIOUS"):
        settings(jwt_secret_previous=[SecretStr(PREVIOUS), SecretStr("change-me")])
    with pytest.raises(ValidationError, match="CITYPARK_PAYSANDBOX_NOTIFY_SECRET"):
        settings(paysandbox_notify_secret=SecretStr("short"))


@pytest.mark.parametrize("generated", [secrets.token_hex(32), secrets.token_urlsafe(32)])
def test_generated_secrets_are_accepted(generated: str) -> None:
    assert settings(generated).jwt_secret.get_secret_value() == generated


def test_each_purpose_has_its_own_key() -> None:
    keys = {p: derive(MASTER, p) for p in Purpose}
    assert len(set(keys.values())) == len(Purpose)
    assert all(len(k) == 32 for k in keys.values())
    assert MASTER.encode() not in keys.values()
    # Deterministic: every process finds the same key; another master, other keys.
    assert derive_hex(MASTER, Purpose.internal_token) == keys[Purpose.internal_token].hex()
    assert not {derive(PREVIOUS, p) for p in Purpose} & set(keys.values())
    # The internal token is no longer the old HMAC of the master secret.
    old = hmac.new(MASTER.encode(), b"citypark-internal", hashlib.sha256).hexdigest()
    assert internal_token(MASTER) != old


def _app(s: Settings, revoked: dict[str, float] | None = None) -> TestClient:
    app = make_app("auth", "")
    app.state.settings = s
    app.state.runtime = SimpleNamespace(
        revocations=Revocations(lambda: dict(revoked or {})),
        driver_cutoffs=DriverCutoffs(lambda: {}),
    )

    @app.get("/admin")
    def admin(who: ViewerAuth) -> dict[str, str]:
        return {"id": who.id, "role": who.role.value}

    @app.get("/driver")
    def driver(who: DriverAuth) -> dict[str, str]:
        return {"id": who.id}

    @app.get("/internal")
    def internal(_: InternalAuth) -> dict[str, str]:
        return {}

    return TestClient(app)


def _call(client: TestClient, path: str, token: str) -> tuple[int, str | None]:
    answer = client.get(path, headers={"authorization": f"Bearer {token}"})
    return answer.status_code, answer.json().get("code")


def _forged(key: bytes | str, **claims: Any) -> str:
    now = int(time.time())
    base = {"iss": ISSUER, "sub": "admin:x", "kind": "admin", "role": "admin", "jti": "x"}
    return jwt.encode({**base, "iat": now, "exp": now + 600, **claims}, key, algorithm="HS256")


def test_tokens_verify_only_under_the_key_of_their_kind() -> None:
    client = _app(settings())
    admin, jti = issue_admin_token(MASTER, Role.finance)
    assert client.get("/admin", headers={"authorization": f"Bearer {admin}"}).json() == {
        "id": jti,
        "role": "finance",
    }
    driver = issue_driver_token(MASTER, "d-1", 600)
    assert _call(client, "/driver", driver) == (200, None)
    assert _call(client, "/admin", driver) == (403, "forbidden")
    # Signed with the master secret itself (as before keys were derived): refused.
    assert _call(client, "/admin", _forged(MASTER)) == (401, "unauthorized")
    # Claiming to be an admin token under the drivers' key: refused.
    assert _call(client, "/admin", _forged(derive(MASTER, Purpose.driver_tokens))) == (
        401,
        "unauthorized",
    )
    assert _call(client, "/admin", _forged(derive(MASTER, Purpose.admin_tokens))) == (200, None)


def test_admin_tokens_without_an_expiry_or_past_it_are_refused() -> None:
    client = _app(settings())
    key = derive(MASTER, Purpose.admin_tokens)
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "admin:old", "kind": "admin", "role": "admin", "jti": "old"}
    legacy = jwt.encode({**claims, "iat": now}, key, algorithm="HS256")  # issued without `exp`
    assert _call(client, "/admin", legacy) == (401, "token_expired")
    assert _call(client, "/admin", _forged(key, exp=now - 5)) == (401, "token_expired")
    issued = new_admin_token(MASTER, Role.admin, ttl_s=60)
    decoded = jwt.decode(issued.token, key, algorithms=["HS256"], issuer=ISSUER)
    assert decoded["exp"] - decoded["iat"] == 60
    assert int(issued.expires_at.timestamp()) == decoded["exp"]
    assert issued.expires_at.utcoffset() is not None


def test_a_revoked_admin_token_is_refused_with_its_own_code() -> None:
    token, jti = issue_admin_token(MASTER, Role.admin)
    other, _ = issue_admin_token(MASTER, Role.admin)
    client = _app(settings(), revoked={jti: time.time() + 600})
    assert _call(client, "/admin", token) == (401, "token_revoked")
    assert _call(client, "/admin", other) == (200, None)


def test_tokens_and_internal_calls_under_the_previous_secret_pass_while_it_is_rotated() -> None:
    old_admin, _ = issue_admin_token(PREVIOUS, Role.admin)
    old_driver = issue_driver_token(PREVIOUS, "d-1", 600)
    rotated = _app(settings(jwt_secret_previous=[SecretStr(PREVIOUS)]))
    assert _call(rotated, "/admin", old_admin) == (200, None)
    assert _call(rotated, "/driver", old_driver) == (200, None)
    for secret in (MASTER, PREVIOUS):
        answer = rotated.get("/internal", headers={INTERNAL_HEADER: internal_token(secret)})
        assert answer.status_code == 200
    done = _app(settings())  # the rotation is over: the old secret is dropped
    assert _call(done, "/admin", old_admin) == (401, "unauthorized")
    assert _call(done, "/driver", old_driver) == (401, "unauthorized")
    stale = done.get("/internal", headers={INTERNAL_HEADER: internal_token(PREVIOUS)})
    assert stale.status_code == 401


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_revocations_refresh_on_read_at_most_every_max_age() -> None:
    calls: list[int] = []
    listed: dict[str, float] = {}

    def source() -> dict[str, float]:
        calls.append(1)
        return dict(listed)

    clock = Clock()
    revocations = Revocations(source, max_age_s=5, clock=clock)
    assert not revocations.is_revoked("a")
    listed["a"] = time.time() + 600
    clock.now += 4.9
    assert not revocations.is_revoked("a")  # the list is young: not asked again
    assert len(calls) == 1
    clock.now += 0.2
    assert revocations.is_revoked("a")
    assert len(calls) == 2
    # Revoked in this process: in force at once, before any refresh.
    revocations.add("b", time.time() + 600)
    assert revocations.is_revoked("b")
    # Past its expiry a token needs no listing (it is refused as expired anyway).
    revocations.add("c", time.time() - 1)
    assert not revocations.is_revoked("c")


def test_an_unreachable_gateway_keeps_the_last_list_and_is_logged_once() -> None:
    up = True
    calls: list[int] = []

    def source() -> dict[str, float]:
        calls.append(1)
        if not up:
            raise ConnectionError("gateway down")
        return {"a": time.time() + 600}

    clock = Clock()
    revocations = Revocations(source, max_age_s=5, clock=clock)
    assert revocations.is_revoked("a")
    up = False
    with capture_logs() as logs:
        for _ in range(3):
            clock.now += 5
            assert revocations.is_revoked("a")  # the last known list stays in force
            assert revocations.is_revoked("a")  # and a failure is not retried at once
        up = True
        clock.now += 5
        assert revocations.is_revoked("a")
    assert len(calls) == 5
    assert [e["event"] for e in logs] == [
        "auth.revocations_unavailable",
        "auth.revocations_available",
    ]


def _sandbox(s: Settings) -> TestClient:
    app = make_app("sandbox", "")
    app.state.settings = s

    @app.get("/v1/thing")
    def thing(_: Annotated[None, Depends(require_caller)]) -> dict[str, str]:
        return {}

    return TestClient(app)


def test_the_paysandbox_wants_billings_token_outside_sandbox_mode() -> None:
    closed = _sandbox(settings(sandbox_mode=False))
    assert closed.get("/v1/thing").json()["code"] == "sandbox_token_invalid"
    assert closed.get("/v1/thing").status_code == 401
    wrong = {"authorization": f"Bearer {derive_hex(MASTER, Purpose.internal_token)}"}
    assert closed.get("/v1/thing", headers=wrong).status_code == 401
    right = {"authorization": f"Bearer {sandbox_token(settings())}"}
    assert closed.get("/v1/thing", headers=right).status_code == 200
    assert _sandbox(settings(sandbox_mode=True)).get("/v1/thing").status_code == 200


@pytest.mark.parametrize(("text", "seconds"), [("30m", 1800), ("8h", 28800), ("7d", 604800)])
def test_token_lifetimes_read_as_minutes_hours_days(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("bad", ["", "8", "8x", "0h", "-1h", "91d", "1.5h"])
def test_other_lifetimes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="lifetime|lives between"):
        parse_ttl(bad)


DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_the_deployment_ships_no_secret_value() -> None:
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".yml", ".sh", ".env", ""}:
            text = path.read_text(errors="ignore").lower()
            assert "change-me" not in text, path
            assert "changeme" not in text, path
    for doc in yaml.safe_load_all((DEPLOY / "k8s" / "config.yaml").read_text()):
        assert doc["kind"] != "Secret"
        assert "CITYPARK_JWT_SECRET" not in doc.get("data", {})


def test_production_manifests_leave_the_payment_sandbox_out() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["services"]["paysandbox"]["profiles"] == ["sandbox"]
    base = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    for resource in base["resources"]:
        assert "paysandbox" not in (DEPLOY / "k8s" / resource).read_text(), resource
    overlay = yaml.safe_load((DEPLOY / "k8s-sandbox" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../k8s", "paysandbox.yaml"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the manifests")
def test_both_kustomizations_render() -> None:
    def render(name: str) -> list[dict[str, Any]]:
        out = subprocess.run(
            ["kubectl", "kustomize", str(DEPLOY / name)], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    production = render("k8s")
    assert not [d for d in production if d["kind"] == "Secret"]
    assert "paysandbox" not in {d["metadata"]["name"] for d in production}
    [settings_map] = [d for d in production if d["metadata"]["name"] == "citypark-settings"]
    assert settings_map["data"]["CITYPARK_GATEWAY_URL"] == "http://gateway:8000"
    sandbox = render("k8s-sandbox")
    names = {(d["kind"], d["metadata"]["name"]) for d in sandbox}
    assert {("Deployment", "paysandbox"), ("Service", "paysandbox")} <= names
