"""CityPark connector SDK: report gate events durably, signed, and decide at the exit gate."""

from ._client import (
    ConnectorClient,
    ConnectorError,
    Decision,
    EntryResult,
    EventRejected,
    ExitResult,
    Snapshot,
)
from ._keys import generate_keypair, load_private_key
from ._outbox import EventState, Outbox, OutboxEvent
from ._passes import PassEntry
from ._plates import SnapshotKdf, normalize_plate, plate_hash
from ._signing import SignatureAuth, sign_request
from ._version import __version__

__all__ = [
    "ConnectorClient",
    "ConnectorError",
    "Decision",
    "EntryResult",
    "EventRejected",
    "EventState",
    "ExitResult",
    "Outbox",
    "OutboxEvent",
    "PassEntry",
    "SignatureAuth",
    "Snapshot",
    "SnapshotKdf",
    "__version__",
    "generate_keypair",
    "load_private_key",
    "normalize_plate",
    "plate_hash",
    "sign_request",
]
