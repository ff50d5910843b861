"""The production manifests make Redis and Kafka demand credentials, and hand them to every
client from the environment / a Secret, never from a committed value. (That the servers really
refuse strangers: tests/integration/test_broker_auth.py.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _properties(path: Path) -> dict[str, str]:
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    return dict(ln.split("=", 1) for ln in lines)


def test_compose_clients_authenticate_with_passwords_from_the_environment() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    env = compose["x-app"]["environment"]
    assert env["CITYPARK_REDIS_URL"].startswith("redis://citypark:${CITYPARK_REDIS_PASSWORD:?")
    assert env["CITYPARK_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
    assert env["CITYPARK_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert env["CITYPARK_KAFKA_SASL_PASSWORD"].startswith("${CITYPARK_KAFKA_PASSWORD:?")
    # the topics Job and every part take the same environment
    assert compose["services"]["topics"]["environment"] == env
    assert compose["services"]["gateway"]["environment"] == env


def test_compose_servers_refuse_clients_without_credentials() -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    redis_start = " ".join(services["redis"]["entrypoint"])
    assert "--aclfile /data/users.acl" in redis_start
    assert "/etc/citypark/citypark.acl" in redis_start
    assert "grep -q PONG" in services["redis"]["healthcheck"]["test"][1]  # NOAUTH exits 0
    kafka = services["kafka"]
    assert kafka["entrypoint"] == ["sh", "/etc/citypark/start.sh"]
    assert not any(k.startswith("KAFKA_LISTENERS") for k in kafka["environment"])
    assert "--command-config" in kafka["healthcheck"]["test"][1]


def test_the_production_broker_listens_only_with_sasl() -> None:
    conf = _properties(DEPLOY / "kafka" / "server-sasl.properties")
    listeners = dict(x.split("://", 1) for x in conf["listeners"].split(","))
    assert listeners["SASL_PLAINTEXT"].startswith("@HOST@:")
    assert listeners["CONTROLLER"].startswith("127.0.0.1:")  # the quorum stays on the node
    assert set(listeners) == {"SASL_PLAINTEXT", "CONTROLLER"}
    assert conf["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert conf["inter.broker.listener.name"] == "SASL_PLAINTEXT"
    acl = (DEPLOY / "redis" / "citypark.acl").read_text().splitlines()
    assert acl[0] == "user default off"
    assert acl[1].startswith("user citypark on >@PASSWORD@ ")
    assert "-@dangerous" in acl[1]


def test_local_loopback_stays_plaintext() -> None:
    # make test / make run / infra.sh: unchanged, no credentials on the developer's machine
    conf = _properties(DEPLOY / "local" / "kafka" / "server.properties")
    assert conf["listeners"].startswith("PLAINTEXT://127.0.0.1:")
    assert "SASL" not in (DEPLOY / "local" / "real.env").read_text()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the manifests")
def test_k8s_takes_broker_credentials_from_secrets() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    docs: list[dict[str, Any]] = [d for d in yaml.safe_load_all(out.stdout) if d]
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}

    settings = by_name[("ConfigMap", "citypark-settings")]["data"]
    assert settings["CITYPARK_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert "CITYPARK_REDIS_URL" not in settings  # it carries the password: in the Secret
    assert not any("PASSWORD" in k for k in settings)

    redis_conf = by_name[("ConfigMap", "redis-config")]["data"]["redis.conf"]
    assert "aclfile /etc/redis-acl/users.acl" in redis_conf
    pod = by_name[("StatefulSet", "redis")]["spec"]["template"]["spec"]
    [acl_volume] = [v for v in pod["volumes"] if v["name"] == "acl"]
    assert acl_volume["secret"]["secretName"] == "citypark-redis"
    [container] = pod["containers"]
    assert "grep -q PONG" in container["readinessProbe"]["exec"]["command"][-1]

    job = by_name[("Job", "citypark-kafka-topics")]["spec"]["template"]["spec"]
    [topics] = job["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in topics["env"]}
    assert refs == {
        "CITYPARK_KAFKA_SASL_USERNAME": "citypark-secrets",
        "CITYPARK_KAFKA_SASL_PASSWORD": "citypark-secrets",
    }
    for (kind, _), doc in by_name.items():
        if kind == "Deployment":
            [c] = doc["spec"]["template"]["spec"]["containers"]
            assert {"secretRef": {"name": "citypark-secrets"}} in c["envFrom"]
