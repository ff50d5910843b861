"""Every part stops within 10 s of SIGTERM with status 0, under load, and what it accepted
before the signal is all there after a restart.

Each part runs as its own `citypark run` process: the whole city on the embedded default
(loaded by `citypark simulate` and a tracked connector), billing on the real infrastructure
(loaded with sign-in requests), and a district adapter on the real infrastructure (loaded
through its Kafka topic). Load is bounded in time and count, on loopback only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from citypark_connector import ConnectorClient
from kafka.admin import KafkaAdminClient
from pydantic import SecretStr
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from loadtests.topology import CITYPARK, ROOT, Ports, real_env
from services.billing.driver.models import SmsMessage
from services.lots.districts import adapter, provision
from services.lots.models import District
from services.sessions.models import ParkingSession
from shared.bus.kafka import KafkaBus
from shared.bus.models import InboxRow
from shared.events import CloudEvent, EventType, Kind, LotEvent, new_event
from shared.pii_columns import bind_data_keys
from shared.settings import BusKind, CacheKind, Settings
from shared.timeutil import utcnow
from shared.topics import lot_events
from tests.conftest import Infra, scratch_database

pytestmark = pytest.mark.e2e
figures = logging.getLogger(__name__)  # the figures: run with --log-cli-level=INFO to see them

STOP_LIMIT_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [CITYPARK, *args], env=env, cwd=cwd, stdout=log.open("ab"), stderr=subprocess.STDOUT
    )


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        assert proc.poll() is None, f"exited early:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not healthy in {timeout_s} s:\n{log.read_text()[-3000:]}")


def _wait_for_line(log: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        assert proc.poll() is None, f"exited early:\n{log.read_text()[-3000:]}"
        if text in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not logged in {timeout_s} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes], log: Path) -> tuple[int, float]:
    """SIGTERM; the exit status and how long the process took to be gone."""
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        tail = log.read_text()[-3000:]
        raise AssertionError(f"still running 30 s after SIGTERM:\n{tail}") from None
    return rc, time.monotonic() - began


def _stopped_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "process.stopped" in ln]
    return lines[-1] if lines else "(no process.stopped line)"


def _wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached in {timeout_s} s")


@contextmanager
def _reaped(*procs: subprocess.Popen[bytes]) -> Iterator[None]:
    """Whatever a failed test leaves running is killed (only these processes)."""
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


class _Entries:
    """A car park reporting entries of plates never seen before, as fast as the city takes
    them; remembers which event ids the city accepted."""

    def __init__(
        self, base_url: str, key_id: str, private_pem: str, prefix: str, limit: int = 3000
    ) -> None:
        self.client = ConnectorClient(key_id, private_pem, base_url=base_url, timeout=10.0)
        self.accepted: list[str] = []
        self.refused: Counter[str] = Counter()
        self.limit = limit
        self.stop = threading.Event()
        self.prefix = prefix + random.choice("ABCDFGHJKLMN")
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for n in range(self.limit):
            if self.stop.is_set():
                return
            try:
                answer = self.client.report_entry(
                    plate=f"苏{self.prefix}{n:04d}",
                    plate_color="blue",
                    vehicle_type="small",
                    lane="E9",
                    occurred_at=utcnow() - timedelta(minutes=5),
                    event_id=str(uuid.uuid4()),
                )
            except Exception as exc:  # busy, or stopping: nothing was accepted
                self.refused[type(exc).__name__ + str(getattr(exc, "code", ""))] += 1
                time.sleep(0.05)
                continue
            if answer.status == "accepted":
                self.accepted.append(answer.event_id)

    def __enter__(self) -> _Entries:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.client.close()


def test_the_whole_city_stops_within_10_s_under_load_and_keeps_what_it_accepted(
    tmp_path: Path,
) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CITYPARK_")},
        "CITYPARK_JWT_SECRET": uuid.uuid4().hex * 2,
        "CITYPARK_DATABASE_URL": f"sqlite:///{tmp_path / 'city.db'}",
        "CITYPARK_BUS": "log",
        "CITYPARK_CACHE": "memory",
        "CITYPARK_PORT": str(port),
        "CITYPARK_LOTS_URL": base,
        "CITYPARK_SESSIONS_URL": base,
        "CITYPARK_BILLING_URL": base,
        "CITYPARK_PAYSANDBOX_URL": base + "/sandbox/pay",
    }
    first_log, second_log = tmp_path / "run-1.log", tmp_path / "run-2.log"
    # `--demo` seeds the car parks and writes their keys, which the simulator signs with.
    city = _start(["run", "all", "--demo"], env, tmp_path, first_log)
    with _reaped(city):
        _wait_healthy(base, city, first_log, 120)
        keys = tmp_path / ".local" / "demo-keys"
        manifest = json.loads((keys / "lots.json").read_text())
        simulate = _start(
            ["simulate", "--lots", "6", "--rate", "8", "--duration", "20", "--base-url", base]
            + ["--keys-dir", str(keys)],
            env,
            tmp_path,
            tmp_path / "simulate.log",
        )
        with _reaped(simulate):
            tracked = [
                _Entries(base, lot["key_id"], (keys / f"{lot['key_id']}.key").read_text(), prefix)
                for lot, prefix in zip(manifest[-4:], "ABCD", strict=True)
            ]
            with contextlib.ExitStack() as stack:
                for entries in tracked:
                    stack.enter_context(entries)
                time.sleep(8)  # under load: the simulator and the tracked car parks
                rc, took = _stop(city, first_log)
            accepted = [i for entries in tracked for i in entries.accepted]
            refused = sum((entries.refused for entries in tracked), Counter[str]())
            figures.info(
                f"run all under load: exit {rc} after {took:.2f} s; {_stopped_line(first_log)}"
            )
            assert rc == 0
            assert took < STOP_LIMIT_S
            assert accepted, "the load reached the city"

            city = _start(["run", "all"], env, tmp_path, second_log)
            with _reaped(city):
                _wait_healthy(base, city, second_log, 120)
                engine = create_engine(env["CITYPARK_DATABASE_URL"])
                wanted = set(accepted)

                def all_parked() -> bool:
                    with Session(engine) as db:
                        ids = db.scalars(select(ParkingSession.entry_event_id)).all()
                    return wanted <= {i.rsplit("/", 1)[-1] for i in ids}

                _wait_until(all_parked, 90, f"{len(wanted)} accepted entries as parkings")
                figures.info(
                    f"{len(wanted)} entries accepted before SIGTERM (refused: "
                    f"{dict(refused)}), all parked after restart"
                )
                simulate.kill()
                simulate.wait()
                rc, took = _stop(city, second_log)
                figures.info(f"run all idle: exit {rc} after {took:.2f} s")
                assert rc == 0
                assert took < STOP_LIMIT_S


def _group_is_busy(kafka: str, group: str) -> bool:
    admin = KafkaAdminClient(bootstrap_servers=kafka)
    try:
        return any(d.get("members") for d in admin.describe_groups([group]).values())
    finally:
        admin.close()


def test_billing_stops_within_10_s_under_load_and_keeps_what_it_accepted(
    infra: Infra, tmp_path: Path
) -> None:
    if _group_is_busy(infra.kafka_bootstrap, "citypark-billing"):
        pytest.skip("a billing of someone else consumes on this broker; it would share its group")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log, again_log = tmp_path / "billing-1.log", tmp_path / "billing-2.log"
    with scratch_database(infra) as database_url:
        env = real_env(database_url, infra.redis_url, infra.kafka_bootstrap, Ports(billing=port))
        subprocess.run([CITYPARK, "migrate"], env=env, cwd=ROOT, check=True, capture_output=True)
        billing = _start(["run", "billing", "--port", str(port)], env, ROOT, log)
        with _reaped(billing):
            _wait_healthy(base, billing, log, 90)
            first = random.randrange(10_000_000, 90_000_000)
            accepted: list[str] = []
            stop = threading.Event()

            def sign_in_requests(worker: int) -> None:
                with httpx.Client(base_url=base, timeout=5) as http:
                    for n in range(400):
                        if stop.is_set():
                            return
                        phone = f"139{first + worker * 1000 + n:08d}"
                        try:
                            answer = http.post(
                                "/v1/auth/otp",
                                json={"phone": phone},
                                headers={"Idempotency-Key": f"otp-{phone}"},
                            )
                        except httpx.TransportError:
                            time.sleep(0.05)
                            continue
                        if answer.status_code == 202:
                            accepted.append(phone)

            with ThreadPoolExecutor(6) as pool:
                for w in range(6):
                    pool.submit(sign_in_requests, w)
                time.sleep(5)
                rc, took = _stop(billing, log)
                stop.set()
            figures.info(f"billing under load: exit {rc} after {took:.2f} s; {_stopped_line(log)}")
            assert rc == 0
            assert took < STOP_LIMIT_S
            assert accepted, "the load reached billing"

        billing = _start(["run", "billing", "--port", str(port)], env, ROOT, again_log)
        with _reaped(billing):
            _wait_healthy(base, billing, again_log, 90)
            # Phones are encrypted at rest: read them with the city's keys.
            keys = Settings(jwt_secret=SecretStr(env["CITYPARK_JWT_SECRET"]))
            engine = bind_data_keys(create_engine(database_url), keys)
            with Session(engine) as db:
                sent = set(db.scalars(select(SmsMessage.phone)))
            engine.dispose()
            missing = set(accepted) - sent
            assert not missing, f"{len(missing)} of {len(accepted)} accepted sign-ins lost"
            # The remembered answers survived too: a retry is answered, not run again.
            replay = httpx.post(
                base + "/v1/auth/otp",
                json={"phone": accepted[0]},
                headers={"Idempotency-Key": f"otp-{accepted[0]}"},
            )
            assert replay.headers.get("idempotent-replayed") == "true"
            rc, took = _stop(billing, again_log)
            figures.info(
                f"{len(accepted)} sign-ins accepted, none lost; billing idle: {took:.2f} s"
            )
            assert rc == 0
            assert took < STOP_LIMIT_S


def test_a_district_adapter_stops_within_10_s_under_load_and_loses_nothing(
    infra: Infra, tmp_path: Path
) -> None:
    # A district of its own: its own topic and consumer group on the shared broker. Its car
    # parks are unknown to the city, so every event is taken and refused (inbox, counted)
    # and nothing reaches the city-wide parking topic that other runs may be reading.
    code = f"stop{uuid.uuid4().hex[:6]}"
    log, again_log = tmp_path / "district-1.log", tmp_path / "district-2.log"
    with scratch_database(infra) as database_url:
        env = real_env(database_url, infra.redis_url, infra.kafka_bootstrap, Ports())
        subprocess.run([CITYPARK, "migrate"], env=env, cwd=ROOT, check=True, capture_output=True)
        engine = create_engine(database_url)
        with Session(engine) as db, db.begin():
            db.add(District(code=code, name="stop drill", dialect="canonical"))
        settings = Settings(
            database_url=database_url,
            kafka_bootstrap=infra.kafka_bootstrap,
            bus=BusKind.kafka,
            cache=CacheKind.redis,
            jwt_secret=SecretStr("stopping-tests-secret-0123456789abcdef"),
        )
        provision.ensure_topic(settings, code)
        # events travel with the plate sealed under the district process's keys
        keys = Settings(jwt_secret=SecretStr(env["CITYPARK_JWT_SECRET"]))
        bus = KafkaBus(infra.kafka_bootstrap)
        published: list[str] = []
        stop = threading.Event()

        def publish() -> None:
            for _ in range(40):  # at most 8,000 events, faster than one adapter takes them
                if stop.is_set():
                    return
                batch = [_lot_event(code, keys) for _ in range(200)]
                bus.publish_many([(lot_events(code), e.subject or "", e) for e in batch])
                published.extend(e.id for e in batch)
                time.sleep(0.1)

        def taken() -> int:
            with Session(engine) as db:
                rows = db.scalars(
                    select(InboxRow.event_id).where(InboxRow.consumer == adapter.group_of(code))
                )
                return len(set(rows) & set(published))

        district = _start(["run", "district", code], env, ROOT, log)
        with _reaped(district):
            _wait_for_line(log, "consumer.started", district, 60)
            feeder = threading.Thread(target=publish, daemon=True)
            feeder.start()
            _wait_until(lambda: taken() > 500, 60, "the adapter under load")
            rc, took = _stop(district, log)
            stop.set()
            feeder.join(timeout=30)
            before = taken()
        figures.info(f"district under load: exit {rc} after {took:.2f} s; {_stopped_line(log)}")
        assert rc == 0
        assert took < STOP_LIMIT_S

        district = _start(["run", "district", code], env, ROOT, again_log)
        with _reaped(district):
            _wait_until(lambda: taken() == len(published), 90, "every published event taken")
            rc, took = _stop(district, again_log)
        bus.close()
        engine.dispose()
        figures.info(
            f"{len(published)} events published, {before} taken before SIGTERM, all taken "
            f"after restart; district idle: exit {rc} after {took:.2f} s"
        )
        assert rc == 0
        assert took < STOP_LIMIT_S


def _lot_event(district: str, keys: Settings) -> CloudEvent:
    lot_id = str(uuid.uuid4())
    now = utcnow()
    return new_event(
        EventType.connector_entry,
        source="gateway",
        subject=lot_id,
        data=LotEvent(
            event_id=str(uuid.uuid4()),
            kind=Kind.entry,
            lot_id=lot_id,
            lot_code="STOP-0001",
            district=district,
            operator_id=str(uuid.uuid4()),
            plate="苏E12345",
            plate_color="blue",
            occurred_at=now,
            received_at=now,
        ).sealed(keys),
    )
