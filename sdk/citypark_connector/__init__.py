"""CityPark connector SDK: sign requests to the connector API and report gate events."""

from ._client import ConnectorClient, ConnectorError, EntryResult, ExitResult
from ._keys import generate_keypair, load_private_key
from ._signing import SignatureAuth, sign_request
from ._version import __version__

__all__ = [
    "ConnectorClient",
    "ConnectorError",
    "EntryResult",
    "ExitResult",
    "SignatureAuth",
    "__version__",
    "generate_keypair",
    "load_private_key",
    "sign_request",
]
