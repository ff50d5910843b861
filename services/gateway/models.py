from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import make_base
from shared.pii_columns import Encrypted
from shared.timeutil import utcnow

Base = make_base("gateway")


class AdminToken(Base):
    """Admin tokens are stored hashed only: the token itself is shown once."""

    __tablename__ = "gateway_admin_token"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    note: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    name: Mapped[str] = mapped_column(String(200), default="", server_default="")


class EligibilitySet(Base):
    """The hashed plates of one eligibility snapshot as served, stored once however many car
    parks got it: 32-byte hashes, sorted, concatenated."""

    __tablename__ = "gateway_eligibility_set"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    hashes: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EligibilityServed(Base):
    """A car park got eligibility snapshot `version` at `served_at`, and used it until it got
    another one (`superseded_at`): what backs the gate's offline `postpay` later."""

    __tablename__ = "gateway_eligibility_served"

    lot_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), index=True)
    # How its vehicles were hashed (`scrypt$n$r$p$dklen$<salt>`); None: sha256, the first format.
    kdf: Mapped[str | None] = mapped_column(String(160), default=None)
    served_at: Mapped[datetime] = mapped_column(default=utcnow)
    superseded_at: Mapped[datetime | None] = mapped_column(default=None, index=True)


class OfflineClaim(Base):
    """An offline gate decision the city did not take as stated, for the operator to take up:
    an unbacked `postpay`, or a `pay_on_site`/`free` where the city would have said `postpay`."""

    __tablename__ = "gateway_offline_claim"

    lot_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    lot_code: Mapped[str] = mapped_column(String(64))
    plate: Mapped[str] = mapped_column(Encrypted())  # at rest under the data key
    plate_color: Mapped[str] = mapped_column(String(16))
    claimed_decision: Mapped[str] = mapped_column(String(20))
    eligibility_version: Mapped[int | None] = mapped_column(BigInteger, default=None)
    decided_at: Mapped[datetime]
    reason: Mapped[str] = mapped_column(String(40))
    decision: Mapped[str] = mapped_column(String(20))  # what the city recorded
    driver_id: Mapped[str | None] = mapped_column(String(36), default=None)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
