"""Kafka backend (kafka-python): idempotent producer with acks=all, classic consumer groups
with manual commits after processing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.serializer import Serializer
from kafka.structs import OffsetAndMetadata

from shared.bus.port import Message, decode
from shared.events import CloudEvent
from shared.settings import KafkaAuth, KafkaSecurityProtocol

SEND_TIMEOUT_S = 15.0


def client_config(auth: KafkaAuth) -> dict[str, Any]:
    """The security options every Kafka client of the city passes (producer, consumer, admin):
    nothing on loopback PLAINTEXT, SASL (SCRAM-SHA-512 by default) with the service's own
    credentials in production."""
    if auth.kafka_security_protocol is KafkaSecurityProtocol.plaintext:
        return {}
    password = auth.kafka_sasl_password
    return {
        "security_protocol": auth.kafka_security_protocol.value,
        "sasl_mechanism": auth.kafka_sasl_mechanism,
        "sasl_plain_username": auth.kafka_sasl_username,
        "sasl_plain_password": password.get_secret_value() if password else None,
    }


class _KeySerializer(Serializer):
    def serialize(self, topic: str, headers: list[tuple[str, bytes]], data: Any) -> bytes:
        return str(data).encode()


class _EventSerializer(Serializer):
    """CloudEvents structured mode: the whole envelope is the record value, as JSON."""

    def serialize(self, topic: str, headers: list[tuple[str, bytes]], data: Any) -> bytes:
        return data.to_json()  # type: ignore[no-any-return]


class KafkaBus:
    def __init__(
        self, bootstrap: str, client_id: str = "citypark", config: dict[str, Any] | None = None
    ) -> None:
        self.producer = KafkaProducer(
            **(config or {}),
            bootstrap_servers=bootstrap.split(","),
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            retries=5,
            max_in_flight_requests_per_connection=5,
            key_serializer=_KeySerializer(),
            value_serializer=_EventSerializer(),
        )

    def publish(self, topic: str, key: str, event: CloudEvent) -> None:
        self.publish_many([(topic, key, event)])

    def publish_many(self, items: Sequence[tuple[str, str, CloudEvent]]) -> None:
        # Wait for our own records only (no global flush): concurrent requests share the
        # producer's batches, and each returns as soon as the broker acknowledged its records.
        futures = [self.producer.send(t, key=k, value=e) for t, k, e in items]
        for f in futures:
            f.get(timeout=SEND_TIMEOUT_S)  # raises when the broker did not acknowledge

    def close(self) -> None:
        self.producer.close(timeout=5)


class KafkaSubscription:
    def __init__(
        self,
        bootstrap: str,
        group: str,
        topics: Sequence[str],
        config: dict[str, Any] | None = None,
    ) -> None:
        self.consumer = KafkaConsumer(
            *topics,
            **(config or {}),
            bootstrap_servers=bootstrap.split(","),
            group_id=group,
            client_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=200,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
        )

    def poll(self, timeout_s: float) -> list[Message]:
        batches = self.consumer.poll(timeout_ms=int(timeout_s * 1000))
        out: list[Message] = []
        for records in batches.values():
            for r in records:
                key = r.key.decode("utf-8", "replace") if r.key else ""
                out.append(decode(r.topic, key, r.value or b"", f"{r.partition}:{r.offset}"))
        return out

    def commit(self, messages: list[Message]) -> None:
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for m in messages:
            partition, offset = (int(x) for x in m.position.split(":"))
            tp = TopicPartition(m.topic, partition)
            nxt = offset + 1
            if tp not in offsets or offsets[tp].offset < nxt:
                offsets[tp] = OffsetAndMetadata(nxt, "", -1)
        if offsets:
            self.consumer.commit(offsets=offsets)

    def rewind(self) -> None:
        """Go back to the last committed offsets (after a message could not be handled)."""
        for tp in self.consumer.assignment():
            committed = self.consumer.committed(tp)
            if committed is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)

    def close(self) -> None:
        self.consumer.close()
