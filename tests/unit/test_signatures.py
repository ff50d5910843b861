"""RFC 9421 connector signatures: the SDK signer against the gateway's verifier (SPEC §4)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import http_sf
import httpx
import pytest
from citypark_connector import (
    ConnectorClient,
    ConnectorError,
    generate_keypair,
    load_private_key,
    sign_request,
)
from citypark_connector._signing import SignatureAuth
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from http_message_signatures import HTTPMessageSigner, MappingKeyResolver, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import (
    DigestMismatch,
    KeyUnknown,
    Problem,
    SignatureExpired,
    SignatureInvalid,
    SignatureMissing,
)
from shared.signatures import (
    PublicKeyInvalid,
    VerifiedRequest,
    content_digest,
    load_public_key,
    verify_request,
)

NOW = 1_750_000_000.0
BASE = "https://api.citypark.example"
ENTRY = {"event_id": "7d3f1c9e-3a52-4a8e-9d0b-2f1e6c1b7a10", "plate": "苏E12345", "lane": "in-1"}


class Keys:
    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        private_pem, public_pem = generate_keypair()
        self.private_pem = private_pem
        self.private = load_private_key(private_pem)
        self.public = load_public_key(public_pem)


@pytest.fixture
def lot_key() -> Keys:
    return Keys("lot-0421-a")


def resolver(*keys: Keys) -> Callable[[str], Ed25519PublicKey | None]:
    registered = {k.key_id: k.public for k in keys}
    return registered.get


def post_entry(body: Mapping[str, Any] = ENTRY) -> httpx.Request:
    return httpx.Request("POST", f"{BASE}/v1/connector/entries", json=body)


def get_eligibility() -> httpx.Request:
    return httpx.Request(
        "GET", f"{BASE}/v1/connector/eligibility", params={"since": "41", "lane": "out 1"}
    )


def verify(
    request: httpx.Request,
    *keys: Keys,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    method: str | None = None,
    url: str | None = None,
    now: float = NOW,
) -> VerifiedRequest:
    return verify_request(
        method=request.method if method is None else method,
        url=str(request.url) if url is None else url,
        headers=dict(request.headers) if headers is None else headers,
        body=request.content if body is None else body,
        resolve_key=resolver(*keys),
        now=now,
    )


def sign_raw(
    request: httpx.Request,
    keys: Keys,
    *,
    tag: str | None = "citypark",
    covered: tuple[str, ...] = ("@method", "@path", "@query"),
    include_alg: bool = True,
    nonce: str | None = "0123456789abcdefghijkl",
    with_body: bool = True,
) -> httpx.Request:
    """Sign with the library directly, to produce signatures the SDK would never send."""
    HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519,
        key_resolver=MappingKeyResolver(public_keys={}, private_keys={keys.key_id: keys.private}),
    ).sign(
        request,
        key_id=keys.key_id,
        created=datetime.fromtimestamp(NOW, UTC),
        nonce=nonce,
        tag=tag,
        include_alg=include_alg,
        covered_component_ids=covered,
        body=request.content if with_body and request.content else None,
    )
    return request


# Round trips


def test_post_with_body_round_trip(lot_key: Keys) -> None:
    request = sign_request(post_entry(), lot_key.key_id, lot_key.private, created=int(NOW))

    verified = verify(request, lot_key)

    assert verified.key_id == "lot-0421-a"
    assert verified.created == int(NOW)
    assert len(verified.nonce) >= 22
    assert request.headers["content-digest"] == content_digest(request.content)
    assert request.headers["content-digest"].startswith("sha-256=:")
    signature_input = request.headers["signature-input"]
    assert '("@method" "@path" "@query" "content-digest")' in signature_input
    assert 'tag="citypark"' in signature_input
    assert 'alg="ed25519"' in signature_input
    assert 'keyid="lot-0421-a"' in signature_input


def test_get_with_query_round_trip(lot_key: Keys) -> None:
    request = sign_request(get_eligibility(), lot_key.key_id, lot_key.private, created=int(NOW))

    verified = verify(request, lot_key)

    assert verified.key_id == lot_key.key_id
    assert "content-digest" not in request.headers
    assert '("@method" "@path" "@query")' in request.headers["signature-input"]


def test_origin_form_url_verifies(lot_key: Keys) -> None:
    request = sign_request(get_eligibility(), lot_key.key_id, lot_key.private, created=int(NOW))

    verified = verify(request, lot_key, url=request.url.raw_path.decode("ascii"))

    assert verified.key_id == lot_key.key_id


def test_private_key_as_pem_string_signs(lot_key: Keys) -> None:
    request = sign_request(post_entry(), lot_key.key_id, lot_key.private_pem, created=int(NOW))

    assert verify(request, lot_key).key_id == lot_key.key_id


def test_each_signing_uses_a_fresh_nonce(lot_key: Keys) -> None:
    first = sign_request(post_entry(), lot_key.key_id, lot_key.private, created=int(NOW))
    second = sign_request(post_entry(), lot_key.key_id, lot_key.private, created=int(NOW))

    assert verify(first, lot_key).nonce != verify(second, lot_key).nonce


def test_header_names_are_case_insensitive(lot_key: Keys) -> None:
    request = sign_request(post_entry(), lot_key.key_id, lot_key.private, created=int(NOW))
    shouted = {
        "SIGNATURE-INPUT": request.headers["signature-input"],
        "Signature": request.headers["signature"],
        "Content-DIGEST": request.headers["content-digest"],
        "Content-Type": "application/json",
    }

    assert verify(request, lot_key, headers=shouted).key_id == lot_key.key_id


def test_any_signature_label_is_accepted(lot_key: Keys) -> None:
    request = sign_request(post_entry(), lot_key.key_id, lot_key.private, created=int(NOW))
    relabelled = {
        "signature-input": request.headers["signature-input"].replace("citypark=", "sig1=", 1),
        "signature": request.headers["signature"].replace("citypark=", "sig1=", 1),
        "content-digest": request.headers["content-digest"],
    }

    assert verify(request, lot_key, headers=relabelled).key_id == lot_key.key_id


def test_rotation_both_active_keys_verify() -> None:
    old, new = Keys("lot-0421-a"), Keys("lot-0421-b")
    signed_old = sign_request(post_entry(), old.key_id, old.private, created=int(NOW))
    signed_new = sign_request(post_entry(), new.key_id, new.private, created=int(NOW))

    assert verify(signed_old, old, new).key_id == "lot-0421-a"
    assert verify(signed_new, old, new).key_id == "lot-0421-b"


# Rejections


def test_tampered_body_is_digest_mismatch(lot_key: Keys) -> None:
    request = sign_request(post_entry(), lot_key.key_id, lot_key.private, created=int(NOW))
    tampered = request.content.replace(b"E12345", b"E99999")

    with pytest.raises(DigestMismatch):
        verify(request, lot_key, body=tampered)


def test_body_without_signed_digest_is_digest_mismatch(lot_key: Keys) -> None:
    request = sign_raw(post_entry(), lot_key, with_body=False)
    request.headers["content-digest"] = content_digest(request.content)

    with pytest.raises(DigestMismatch):
        verify(request, lot_key)


def test_body_added_to_a_bodiless_signature_is_digest_mismatch(lot_key: Keys) -> None:
    request = sign_request(get_eligibility(), lot_key.key_id, lot_key.private, created=int(NOW))

    with pytest.raises(DigestMismatch):
        verify(request, lot_key, body=b'{"smuggled": true}')


def test_replaced_digest_header_is_signature_invalid(lot_key: Keys) -> None:
    request = sign_request(post_entry(), lot_key.key_id, lot_key.private, created=int(NOW))
    tampered = request.content.replace(b"E12345", b"E99999")
    headers = dict(request.headers) | {"content-digest": content_digest(tampered)}

    with pytest.raises(SignatureInvalid):
        verify(request, lot_key, headers=headers, body=tampered)


@pytest.mark.parametrize(
    ("method", "url"),
    [
        pytest.param("POST", f"{BASE}/v1/connector/exits", id="path"),
        pytest.param("POST", f"{BASE}/v1/connector/entries?lane=in-2", id="query"),
        pytest.param("PUT", f"{BASE}/v1/connector/entries", id="method"),
    ],
)
def test_changed_request_line_is_signature_invalid(lot_key: Keys, method: str, url: str) -> None:
    request = sign_request(post_entry(), lot_key.key_id, lot_key.private, created=int(NOW))

    with pytest.raises(SignatureInvalid):
        verify(request, lot_key, method=method, url=url)


def test_changed_query_value_on_get_is_signature_invalid(lot_key: Keys) -> None:
    request = sign_request(get_eligibility(), lot_key.key_id, lot_key.private, created=int(NOW))

    with pytest.raises(SignatureInvalid):
        verify(request, lot_key, url=str(request.url).replace("since=41", "since=0"))


def test_unknown_key_is_key_unknown(lot_key: Keys) -> None:
    request = sign_request(post_entry(), lot_key.key_id, lot_key.private, created=int(NOW))

    with pytest.raises(KeyUnknown):
        verify(request, Keys("some-other-lot"))


def test_signature_by_another_key_is_signature_invalid(lot_key: Keys) -> None:
    impostor = Keys(lot_key.key_id)
    request = sign_request(post_entry(), impostor.key_id, impostor.private, created=int(NOW))

    with pytest.raises(SignatureInvalid):
        verify(request, lot_key)


@pytest.mark.parametrize("offset", [-301, 301])
def test_created_outside_window_is_signature_expired(lot_key: Keys, offset: int) -> None:
    request = sign_request(post_entry(), lot_key.key_id, lot_key.private, created=int(NOW) + offset)

    with pytest.raises(SignatureExpired):
        verify(request, lot_key)


@pytest.mark.parametrize("offset", [-300, 300])
def test_created_at_window_edge_verifies(lot_key: Keys, offset: int) -> None:
    request = sign_request(post_entry(), lot_key.key_id, lot_key.private, created=int(NOW) + offset)

    assert verify(request, lot_key).created == int(NOW) + offset


@pytest.mark.parametrize(
    "dropped",
    [("signature",), ("signature-input",), ("signature", "signature-input")],
    ids=["signature", "signature-input", "both"],
)
def test_missing_signature_headers_is_signature_missing(
    lot_key: Keys, dropped: tuple[str, ...]
) -> None:
    request = sign_request(post_entry(), lot_key.key_id, lot_key.private, created=int(NOW))
    headers = {k: v for k, v in request.headers.items() if k not in dropped}

    with pytest.raises(SignatureMissing):
        verify(request, lot_key, headers=headers)


def test_wrong_tag_is_signature_invalid(lot_key: Keys) -> None:
    request = sign_raw(post_entry(), lot_key, tag="someone-else")

    with pytest.raises(SignatureInvalid):
        verify(request, lot_key)


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"tag": None}, id="no-tag"),
        pytest.param({"include_alg": False}, id="no-alg"),
        pytest.param({"nonce": None}, id="no-nonce"),
        pytest.param({"nonce": "short"}, id="short-nonce"),
        pytest.param({"nonce": "not url safe!not url safe!"}, id="unsafe-nonce"),
        pytest.param({"covered": ("@method", "@path")}, id="no-query"),
        pytest.param({"covered": ("@method", "@query")}, id="no-path"),
        pytest.param({"covered": ("@path", "@query")}, id="no-method"),
    ],
)
def test_missing_required_part_is_signature_invalid(lot_key: Keys, options: dict[str, Any]) -> None:
    request = sign_raw(post_entry(), lot_key, **options)

    with pytest.raises(SignatureInvalid):
        verify(request, lot_key)


def test_other_algorithm_is_signature_invalid(lot_key: Keys) -> None:
    request = sign_request(post_entry(), lot_key.key_id, lot_key.private, created=int(NOW))
    headers = dict(request.headers)
    headers["signature-input"] = headers["signature-input"].replace(
        'alg="ed25519"', 'alg="rsa-pss-sha512"'
    )

    with pytest.raises(SignatureInvalid):
        verify(request, lot_key, headers=headers)


@pytest.mark.parametrize(
    ("signature_input", "signature"),
    [
        ("garbage(", "garbage("),
        ('citypark="@method";tag="citypark"', "citypark=:AAAA:"),
        ('citypark=("@method" "@path" "@query");tag="citypark"', "other=:AAAA:"),
        ('a=("@method");tag="citypark", a=("@path");tag="citypark"', "a=:AAAA:"),
    ],
    ids=["unparseable", "not-inner-list", "label-mismatch", "duplicate-label"],
)
def test_malformed_headers_are_signature_invalid(
    lot_key: Keys, signature_input: str, signature: str
) -> None:
    request = get_eligibility()
    headers = {"signature-input": signature_input, "signature": signature}

    with pytest.raises(SignatureInvalid):
        verify(request, lot_key, headers=headers)


_FUZZ_KEYS = Keys("fuzz-lot")


@settings(max_examples=200, deadline=None)
@given(signature_input=st.text(max_size=200), signature=st.text(max_size=120))
def test_arbitrary_headers_only_ever_raise_problems(signature_input: str, signature: str) -> None:
    headers = {"signature-input": signature_input, "signature": signature}

    with pytest.raises(Problem) as raised:
        verify(get_eligibility(), _FUZZ_KEYS, headers=headers)
    assert raised.value.status == 401


_SIGNED = sign_request(post_entry(), _FUZZ_KEYS.key_id, _FUZZ_KEYS.private, created=int(NOW))


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(["signature-input", "signature", "content-digest"]),
    position=st.integers(min_value=0, max_value=300),
    replacement=st.text(min_size=1, max_size=3),
)
def test_mutated_signature_headers_verify_only_if_equivalent(
    name: str, position: int, replacement: str
) -> None:
    headers = dict(_SIGNED.headers)
    value = headers[name]
    at = position % len(value)
    headers[name] = value[:at] + replacement + value[at + 1 :]

    # Structured fields tolerate some whitespace and leading zeros; nothing else may verify.
    if _parsed(headers[name]) == _parsed(value):
        assert verify(_SIGNED, _FUZZ_KEYS, headers=headers).key_id == _FUZZ_KEYS.key_id
    else:
        with pytest.raises(Problem):
            verify(_SIGNED, _FUZZ_KEYS, headers=headers)


def _parsed(value: str) -> object:
    try:
        return http_sf.parse(value.strip(" \t").encode(), tltype="dictionary")
    except (ValueError, UnicodeEncodeError):
        return None


# Keys


def test_load_public_key_rejects_garbage() -> None:
    with pytest.raises(PublicKeyInvalid) as raised:
        load_public_key("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    assert raised.value.status == 422
    assert raised.value.code == "public_key_invalid"


def test_load_public_key_rejects_non_ed25519() -> None:
    rsa_pem = (
        generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )

    with pytest.raises(PublicKeyInvalid):
        load_public_key(rsa_pem)


def test_load_public_key_rejects_a_private_key(lot_key: Keys) -> None:
    with pytest.raises(PublicKeyInvalid):
        load_public_key(lot_key.private_pem)


# Through the SDK client, against a gateway stand-in that verifies like the real one


class Gateway:
    """A MockTransport handler: verifies each request, answers problem+json on failure."""

    def __init__(self, *keys: Keys) -> None:
        self.resolve = resolver(*keys)
        self.seen: list[tuple[httpx.Request, VerifiedRequest]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        headers = {"x-request-id": f"req-{len(self.seen)}"}
        try:
            verified = verify_request(
                method=request.method,
                url=str(request.url),
                headers=request.headers,
                body=request.content,
                resolve_key=self.resolve,
            )
        except Problem as problem:
            headers["content-type"] = "application/problem+json"
            return httpx.Response(problem.status, json=problem.to_dict(), headers=headers)
        self.seen.append((request, verified))
        if request.url.path.endswith("/entries"):
            event_id = json.loads(request.content)["event_id"]
            return httpx.Response(
                202, json={"event_id": event_id, "status": "accepted"}, headers=headers
            )
        if request.url.path.endswith("/exits"):
            event_id = json.loads(request.content)["event_id"]
            answer = {
                "event_id": event_id,
                "decision": "pay_on_site",
                "reason": "not_eligible",
                "session_id": None,
            }
            return httpx.Response(200, json=answer, headers=headers)
        return httpx.Response(200, json={}, headers=headers)


def client_for(gateway: Gateway, keys: Keys) -> ConnectorClient:
    return ConnectorClient(
        keys.key_id, keys.private_pem, base_url=BASE, transport=httpx.MockTransport(gateway)
    )


def test_client_report_entry_is_signed_and_verified(lot_key: Keys) -> None:
    gateway = Gateway(lot_key)
    with client_for(gateway, lot_key) as client:
        result = client.report_entry(
            plate="苏E12345", plate_color="blue", vehicle_type="small", lane="in-1"
        )

    ((request, verified),) = gateway.seen
    body = json.loads(request.content)
    assert verified.key_id == lot_key.key_id
    assert abs(verified.created - time.time()) < 60
    assert result.status == "accepted"
    assert result.event_id == body["event_id"]
    assert uuid.UUID(body["event_id"]).version == 4
    assert datetime.fromisoformat(body["occurred_at"]).utcoffset() is not None
    assert body | {"event_id": "x", "occurred_at": "y"} == {
        "event_id": "x",
        "occurred_at": "y",
        "plate": "苏E12345",
        "plate_color": "blue",
        "vehicle_type": "small",
        "lane": "in-1",
    }


def test_client_report_exit_and_heartbeat(lot_key: Keys) -> None:
    gateway = Gateway(lot_key)
    event_id = uuid.uuid4()
    with client_for(gateway, lot_key) as client:
        result = client.report_exit(
            plate="苏E12345",
            plate_color="green",
            lane="out-1",
            event_id=event_id,
            occurred_at=datetime(2025, 6, 1, 8, 30, tzinfo=UTC),
        )
        client.heartbeat(free_spaces=12, total_spaces=80)

    assert result.event_id == str(event_id)
    assert (result.decision, result.reason, result.session_id) == (
        "pay_on_site",
        "not_eligible",
        None,
    )
    exit_request, heartbeat_request = (request for request, _ in gateway.seen)
    assert json.loads(exit_request.content)["occurred_at"] == "2025-06-01T08:30:00+00:00"
    assert json.loads(heartbeat_request.content) == {
        "free_spaces": 12,
        "total_spaces": 80,
        "sdk_version": "0.2.0",
    }


def test_client_rejects_naive_occurred_at(lot_key: Keys) -> None:
    with client_for(Gateway(lot_key), lot_key) as client, pytest.raises(ValueError, match="aware"):
        client.report_exit(
            plate="苏E12345", plate_color="blue", lane="out-1", occurred_at=datetime(2025, 6, 1)
        )


def test_client_raises_connector_error_from_problem(lot_key: Keys) -> None:
    unregistered = Keys("lot-unregistered")
    with client_for(Gateway(lot_key), unregistered) as client:
        with pytest.raises(ConnectorError) as raised:
            client.heartbeat(free_spaces=1, total_spaces=2)

    assert raised.value.http_status == 401
    assert raised.value.code == "key_unknown"
    assert "lot-unregistered" in raised.value.detail
    assert raised.value.request_id == "req-0"


def test_client_error_without_problem_body(lot_key: Keys) -> None:
    transport = httpx.MockTransport(lambda _: httpx.Response(502, text="<html>bad gateway"))
    client = ConnectorClient(lot_key.key_id, lot_key.private, base_url=BASE, transport=transport)

    with client, pytest.raises(ConnectorError) as raised:
        client.request("GET", "/v1/connector/eligibility")

    assert (raised.value.http_status, raised.value.code) == (502, "http_502")
    assert raised.value.request_id is None


def test_resent_request_is_signed_afresh(lot_key: Keys) -> None:
    gateway = Gateway(lot_key)
    clock = iter([NOW, NOW + 5]).__next__
    auth = SignatureAuth(lot_key.key_id, lot_key.private, clock=clock)
    request = post_entry()

    with httpx.Client(transport=httpx.MockTransport(_offline(gateway, NOW + 5))) as http:
        first = http.send(request, auth=auth)
        second = http.send(request, auth=auth)

    assert (first.status_code, second.status_code) == (202, 202)
    (_, one), (_, two) = gateway.seen
    assert one.nonce != two.nonce
    assert (one.created, two.created) == (int(NOW), int(NOW) + 5)
    assert request.headers["content-digest"] == content_digest(request.content)


def _offline(gateway: Gateway, now: float) -> Callable[[httpx.Request], httpx.Response]:
    """The gateway with a fixed server clock, for signatures made with a fake clock."""

    def handle(request: httpx.Request) -> httpx.Response:
        verified = verify_request(
            method=request.method,
            url=str(request.url),
            headers=request.headers,
            body=request.content,
            resolve_key=gateway.resolve,
            now=now,
        )
        gateway.seen.append((request, verified))
        return httpx.Response(202, json={})

    return handle


def test_load_private_key_rejects_non_ed25519() -> None:
    rsa_pem = (
        generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        .decode("ascii")
    )

    with pytest.raises(ValueError, match="Ed25519"):
        load_private_key(rsa_pem)


def test_generated_keys_are_a_pair() -> None:
    private_pem, public_pem = generate_keypair()
    private = load_private_key(private_pem)
    public = load_public_key(public_pem)

    public.verify(private.sign(b"citypark"), b"citypark")
    assert isinstance(private, Ed25519PrivateKey)
    assert private_pem.startswith("-----BEGIN PRIVATE KEY-----")
    assert public_pem.startswith("-----BEGIN PUBLIC KEY-----")
