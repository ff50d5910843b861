"""One typed settings object per process, read from `CITYPARK_*` variables (and `.env`)."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from typing import Literal

from pydantic import (
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.keys import secret_problem


class BusKind(StrEnum):
    kafka = "kafka"
    log = "log"  # the embedded durable log table


class CacheKind(StrEnum):
    redis = "redis"
    memory = "memory"


class KafkaSecurityProtocol(StrEnum):
    plaintext = "PLAINTEXT"  # loopback development and tests only
    sasl_plaintext = "SASL_PLAINTEXT"
    sasl_ssl = "SASL_SSL"


class KafkaAuth(BaseSettings):
    """How the city's Kafka clients authenticate. A class of its own so the topics Job, which
    holds no master secret, reads the same variables (deploy/local/create_topics.py)."""

    model_config = SettingsConfigDict(
        env_prefix="CITYPARK_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    kafka_security_protocol: KafkaSecurityProtocol = KafkaSecurityProtocol.plaintext
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> KafkaAuth:
        # Refuse at start-up instead of failing every connection later with an opaque error.
        sasl = self.kafka_security_protocol is not KafkaSecurityProtocol.plaintext
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(
                f"CITYPARK_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol.value} needs "
                "CITYPARK_KAFKA_SASL_USERNAME and CITYPARK_KAFKA_SASL_PASSWORD"
            )
        return self


class Settings(KafkaAuth):  # the Kafka client's credentials come from KafkaAuth
    # Errors never echo the values: a refused secret must not end up in a log.
    model_config = SettingsConfigDict(
        env_prefix="CITYPARK_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    # Embedded defaults: `make run` needs nothing but a secret.
    database_url: str = "sqlite:///.local/citypark.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    kafka_bootstrap: str = "127.0.0.1:9092"
    bus: BusKind = BusKind.log
    cache: CacheKind = CacheKind.memory

    # The master secret: every key of the city (tokens, internal calls, OTP hashes, webhook
    # secrets, idempotency, paysandbox) is derived from it per purpose (shared/keys.py). No
    # default; at least 32 random bytes, placeholders are refused at start-up.
    jwt_secret: SecretStr
    # The secret's earlier values while it is rotated (a JSON list): tokens signed and internal
    # calls made under them are still accepted, and answers remembered for an `Idempotency-Key`
    # (encrypted under a key derived from them) stay readable.
    jwt_secret_previous: list[SecretStr] = Field(default_factory=list)
    driver_token_ttl_s: int = 7 * 24 * 3600
    otp_ttl_s: int = 300
    otp_max_attempts: int = 5
    # Sandbox mode keeps what the SMS port sends (sign-in codes included) in an outbox admins
    # read at /v1/admin/sandbox/sms. For development and tests only: `make run` turns it on.
    sandbox_mode: bool = False
    admin_token_ttl_s: int = Field(
        8 * 3600, ge=60, description="How long an admin token lasts unless `--ttl` says otherwise."
    )
    # Sign-in abuse limits (per client address and for the whole city), shared by every
    # gateway replica through the cache; past them 429 with Retry-After.
    signin_ip_limit: int = Field(
        20, ge=1, description="Sign-in requests one address may make per window."
    )
    signin_global_limit: int = Field(
        2000, ge=1, description="Sign-in requests the whole city accepts per window."
    )
    signin_window_s: int = Field(60, ge=1, description="The sign-in limit window, in seconds.")

    # Request bodies are limited while they are read, before parsing or verifying signatures.
    connector_max_body_bytes: int = Field(1 << 20, ge=1024)
    district_max_body_bytes: int = Field(10 << 20, ge=1024)
    # How long the gateway keeps the eligibility snapshots it served, to check offline decisions.
    eligibility_snapshot_retention_days: int = Field(7, ge=7)
    eligibility_salt_scope: Literal["district", "lot"] = Field(
        "district",
        description="Whose salt hashes a car park's eligibility snapshot: its district's "
        "(default) or its own. Every snapshot lists the same vehicles, so a salt per car park "
        "is no harder to reverse, and multiplies the gateway's hashing by the car parks of a "
        "district.",
    )

    # The vehicle registry that proves a driver holds a plate (the sandbox one by default).
    vehicle_registry_url: str = "http://127.0.0.1:8000/sandbox/vehicle-registry"

    # Where each service is reached for synchronous internal calls.
    gateway_url: str = "http://127.0.0.1:8000"

    # Personal data at rest and in transit (phones, plates): AES-GCM under the key named by
    # `data_key_id`, from `data_keys` (a JSON object key id → secret of 32+ random bytes; older
    # ids stay to read what they wrote until `citypark keys rotate-data` re-encrypts it). Empty:
    # one key derived from the master secret (id `derived`), for development.
    data_keys: dict[str, SecretStr] = Field(default_factory=dict)
    data_key_id: str | None = None
    # Keys HMAC look-up indexes and pseudonyms of plates and phones; changing it means
    # re-indexing (`citypark keys rotate-data --reindex`). Unset: derived from the master secret.
    data_index_key: SecretStr | None = None
    lots_url: str = "http://127.0.0.1:8000"
    sessions_url: str = "http://127.0.0.1:8000"
    billing_url: str = "http://127.0.0.1:8000"
    paysandbox_url: str = "http://127.0.0.1:8000/sandbox/pay"

    arrears_grace_days: int = 7
    arrears_limit_fen: int = 20_000
    # How often billing looks for drivers whose arrears just passed the grace period.
    arrears_sweep_interval_s: float = 60.0

    # Retention (docs/privacy.md, "Retention"): how long each kind of record is kept, in days.
    # Each service purges what it owns on its own schedule; `citypark privacy purge` runs it all.
    retention_raw_events_days: int = Field(
        30, ge=1, description="Bus events already delivered, inbox marks and dead letters."
    )
    retention_session_plates_days: int = Field(
        180,
        ge=1,
        description="After this, a closed parking's plate is replaced by its pseudonym and its "
        "driver link dropped.",
    )
    retention_signin_days: int = Field(
        1, ge=1, description="Sign-in and phone-change codes, and the sandbox SMS outbox."
    )
    retention_notifications_days: int = Field(
        180, ge=1, description="Notifications to drivers and their deliveries."
    )
    retention_money_years: int = Field(
        10,
        ge=10,
        description="Charges, refunds, invoices and the ledger (accounting rules); never purged "
        "before this, anonymised when their driver is deleted.",
    )
    retention_interval_s: float = Field(
        3600.0, gt=0, description="How often each service runs its retention purge."
    )
    retention_batch_size: int = Field(
        500, ge=1, description="Rows one purge transaction touches at most."
    )
    # Threads sending charges to the provider (PostgreSQL; SQLite keeps one). Each mostly waits
    # for the provider, so charges/s ≈ workers / provider latency.
    billing_charge_workers: int = Field(8, ge=1, le=64)

    # The payment sandbox signs its notifications with HMAC-SHA256 under this secret (shared
    # with billing, which verifies them). Unset: derived from the JWT secret.
    paysandbox_notify_secret: SecretStr | None = None
    # Where the sandbox posts notifications; unset: `<billing_url>/v1/providers/sandbox/...`.
    paysandbox_notify_url: str | None = None

    # Connector protocol (SPEC §4).
    signature_max_skew_s: int = 300
    occurred_at_max_past_s: int = 7 * 24 * 3600
    occurred_at_max_future_s: int = 300
    connector_rate_limit_requests: int = Field(
        50,
        ge=1,
        description="Connector API requests one car park may make per window, shared by every "
        "gateway replica through Redis; past it the gateway answers 429 with Retry-After.",
    )
    connector_rate_limit_window_s: int = Field(
        1, ge=1, description="The connector rate-limit window, in whole seconds."
    )
    connector_max_in_flight: int = Field(
        48,
        ge=1,
        description="Connector requests one gateway process works on at once; past it the city "
        "pushes back at once (429 `city_busy` with Retry-After) instead of letting car parks "
        "wait into their timeouts.",
    )

    # Drivers' webhooks (the URL must lead to the public internet).
    webhook_allow_http: bool = Field(
        False,
        description="Accept plain `http` webhook URLs; for development and tests only, "
        "production takes `https` alone.",
    )
    webhook_allowed_networks: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description='Networks (CIDR, a JSON list: `["127.0.0.0/8"]`) webhooks may reach although '
        "they are not public, for development and tests; empty in production, where loopback, "
        "private, link-local and other internal addresses and names are refused.",
    )

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("jwt_secret", "jwt_secret_previous", "paysandbox_notify_secret")
    @classmethod
    def _strong_secret(cls, value: object, info: ValidationInfo) -> object:
        """Refuse to start on a short or placeholder secret rather than sign with it."""
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, SecretStr) and (why := secret_problem(item.get_secret_value())):
                raise ValueError(f"CITYPARK_{(info.field_name or '').upper()} {why}")
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()  # type: ignore[call-arg]  # values come from the environment
