"""Create CityPark's Kafka topics (idempotent), or probe that a broker answers.

    python deploy/local/create_topics.py [--bootstrap HOST:PORT] [--partitions N]
    python deploy/local/create_topics.py --probe     # exit 0 iff a metadata request answers

Topics come from `shared.topics.all_topics()`; partitions from CITYPARK_KAFKA_PARTITIONS (3),
replication factor 1 (one local broker; the k8s Job passes its own). Existing topics are left
as they are. Used by deploy/local/infra.sh and by the topics Job in deploy/k8s; a broker that
wants SASL takes the services' own CITYPARK_KAFKA_SECURITY_PROTOCOL / CITYPARK_KAFKA_SASL_*.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `shared`


def _say(msg: str, err: bool = False) -> None:
    (sys.stderr if err else sys.stdout).write(msg + "\n")


def _default_bootstrap() -> str:
    if os.environ.get("CITYPARK_KAFKA_BOOTSTRAP"):
        return os.environ["CITYPARK_KAFKA_BOOTSTRAP"]
    return "127.0.0.1:" + os.environ.get("CITYPARK_KAFKA_PORT", "9092")


def _admin(bootstrap: str, timeout_ms: int):
    from kafka import KafkaAdminClient

    from shared.bus.kafka import client_config
    from shared.settings import KafkaAuth

    # CITYPARK_KAFKA_SECURITY_PROTOCOL and the SASL credentials, as every service reads them
    return KafkaAdminClient(
        **client_config(KafkaAuth()),
        bootstrap_servers=bootstrap,
        client_id="citypark-topics",
        request_timeout_ms=timeout_ms,
        bootstrap_timeout_ms=timeout_ms,
    )


def probe(bootstrap: str) -> int:
    try:
        admin = _admin(bootstrap, 2000)
        try:
            admin.describe_cluster()
        finally:
            admin.close()
    except Exception as exc:  # any failure means "not ready yet"
        _say(f"kafka not ready: {type(exc).__name__}: {exc}", err=True)
        return 1
    return 0


def create(bootstrap: str, partitions: int, replication: int, timeout_s: float) -> int:
    from kafka.errors import TopicAlreadyExistsError, for_code

    from shared.topics import all_topics

    wanted = all_topics()
    admin = _admin(bootstrap, int(timeout_s * 1000))
    try:
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if missing:
            spec = {
                t: {"num_partitions": partitions, "replication_factor": replication}
                for t in missing
            }
            result = admin.create_topics(spec, timeout_ms=int(timeout_s * 1000), raise_errors=False)
            for topic in result["topics"]:
                err = for_code(topic["error_code"])
                if topic["error_code"] and err is not TopicAlreadyExistsError:
                    _say(
                        f"kafka: creating {topic['name']} failed: {err.__name__}: "
                        f"{topic.get('error_message')}",
                        err=True,
                    )
                    return 1
        admin.wait_for_topics(wanted, timeout_ms=int(timeout_s * 1000))
        counts = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(wanted)}
    finally:
        admin.close()
    odd = sorted(t for t, n in counts.items() if n != partitions)
    note = f"; kept as they are: {', '.join(f'{t}={counts[t]}' for t in odd)}" if odd else ""
    _say(
        f"kafka: topics ready: {len(wanted)} ({len(missing)} created, {partitions} partitions, "
        f"replication {replication}){note}"
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default=_default_bootstrap())
    ap.add_argument(
        "--partitions", type=int, default=int(os.environ.get("CITYPARK_KAFKA_PARTITIONS", "3"))
    )
    ap.add_argument(
        "--replication", type=int, default=int(os.environ.get("CITYPARK_KAFKA_REPLICATION", "1"))
    )
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds")
    ap.add_argument("--probe", action="store_true", help="only check that the broker answers")
    args = ap.parse_args()
    if args.probe:
        return probe(args.bootstrap)
    started = time.monotonic()
    while True:  # a Job may start before the broker: retry until the deadline
        try:
            return create(args.bootstrap, args.partitions, args.replication, args.timeout)
        except Exception as exc:
            if time.monotonic() - started > args.timeout:
                _say(f"kafka: topics not created: {type(exc).__name__}: {exc}", err=True)
                return 1
            time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
