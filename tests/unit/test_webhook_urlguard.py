"""The webhook URL guard: only public internet addresses, checked with an injected resolver (no
DNS), and the channel that re-checks before each send and connects to the checked address."""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from services.billing.notification import urlguard
from services.billing.notification.models import Notification
from services.billing.notification.port import DeliveryFailed, WebhookChannel
from services.billing.notification.urlguard import (
    UrlGuard,
    WebhookUrlForbidden,
    WebhookUrlUnresolvable,
    non_public_reason,
    system_resolver,
)
from shared.settings import Settings

PUBLIC = "93.184.216.34"
PUBLIC6 = "2606:2800:220:1:248:1893:25c8:1946"


class FakeDns:
    """Answers from a table; records every lookup so a test can tell none happened."""

    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table = table or {}
        self.asked: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append((host, port))
        if host not in self.table:
            raise OSError(f"no such host {host}")
        return self.table[host]


def guard(table: dict[str, list[str]] | None = None, **kwargs: object) -> UrlGuard:
    return UrlGuard(resolver=FakeDns(table), **kwargs)  # type: ignore[arg-type]


def refused(g: UrlGuard, url: str) -> str:
    with pytest.raises(WebhookUrlForbidden) as caught:
        g.check(url)
    assert caught.value.code == "webhook_url_forbidden"
    assert caught.value.status == 422
    return caught.value.detail


def test_a_public_https_name_passes_and_names_the_address_to_use() -> None:
    g = guard({"hooks.example.com": [PUBLIC, PUBLIC6]})
    target = g.check("https://hooks.example.com/citypark?x=1")
    assert (target.host, target.address) == ("hooks.example.com", PUBLIC)
    assert g.resolver.asked == [("hooks.example.com", 443)]  # type: ignore[attr-defined]
    g.check("https://Hooks.Example.COM.:8443/x")
    assert g.resolver.asked[-1] == ("hooks.example.com", 8443)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("100.100.100.200", "non-public"),  # Alibaba Cloud metadata, shared address space
        ("100.64.0.1", "non-public"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("0.1.2.3", "private"),  # "this network"
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:7f00:1::1", "loopback"),  # 6to4 around 127.0.0.1
        ("2002:a00:1::1", "private"),  # 6to4 around 10.0.0.1
        ("64:ff9b::a00:1", "reserved"),  # NAT64 prefix
        ("::127.0.0.1", "reserved"),  # IPv4-compatible (deprecated)
    ],
)
def test_a_name_resolving_to_a_non_public_address_is_refused(address: str, reason: str) -> None:
    g = guard({"evil.example.com": [address]})
    detail = refused(g, "https://evil.example.com/hook")
    assert f"resolves to a{'n' if reason[0] in 'aeiou' else ''} {reason} address" in detail
    assert address.split("%")[0] not in detail  # the internal address is not disclosed


def test_one_internal_address_among_public_ones_is_enough_to_refuse() -> None:
    g = guard({"mixed.example.com": [PUBLIC, "10.0.0.7", PUBLIC6]})
    assert "private" in refused(g, "https://mixed.example.com/")


@pytest.mark.parametrize("address", [PUBLIC, "8.8.8.8", PUBLIC6, "2001:4860:4860::8888"])
def test_public_addresses_have_no_reason(address: str) -> None:
    assert non_public_reason(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hook",
        "https://127.0.0.1:8003/internal/billing",
        "https://169.254.169.254/latest/meta-data/",
        "https://10.0.0.1/",
        "https://[::1]/",
        "https://[::ffff:127.0.0.1]/",
        "https://[::ffff:7f00:1]/",
        "https://[fe80::1]/",
        "https://0.0.0.0/",
        f"https://{PUBLIC}/",  # even a public address: webhooks are registered by name
        f"https://[{PUBLIC6}]/",
    ],
)
def test_ip_literals_are_refused_without_a_lookup(url: str) -> None:
    g = guard({})
    detail = refused(g, url)
    assert "register a public host name" in detail
    assert g.resolver.asked == []  # type: ignore[attr-defined]


def test_the_literal_names_why() -> None:
    assert "loopback" in refused(guard(), "https://127.0.0.1/")
    assert "link-local" in refused(guard(), "https://169.254.169.254/")
    assert "loopback" in refused(guard(), "https://[::ffff:127.0.0.1]/")
    assert "is an IP address" in refused(guard(), f"https://{PUBLIC}/")


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST",
        "localhost.",
        "billing",  # one label: a service or container name
        "redis",
        "api.localhost",
        "printer.local",
        "db.internal",
        "metadata.google.internal",
        "box.localdomain",
        "nas.lan",
        "router.home.arpa",
        "wiki.intranet",
        "git.corp",
    ],
)
def test_internal_names_are_refused_without_a_lookup(host: str) -> None:
    # Even when the name would resolve to something public, it is not looked up at all.
    g = guard({host.lower().rstrip("."): [PUBLIC]})
    detail = refused(g, f"https://{host}/hook")
    assert "internal name" in detail
    assert g.resolver.asked == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://hooks.example.com/", "Only https"),
        ("ftp://hooks.example.com/", "Only https"),
        ("ws://hooks.example.com/", "Only https"),
        ("https://user:secret@hooks.example.com/", "user name or password"),
        ("https://user@hooks.example.com/", "user name or password"),
        ("https:///nohost", "no host"),
    ],
)
def test_scheme_credentials_and_host_are_checked_before_any_lookup(url: str, words: str) -> None:
    g = guard({"hooks.example.com": [PUBLIC]})
    assert words in refused(g, url)
    assert g.resolver.asked == []  # type: ignore[attr-defined]


def test_http_only_where_settings_allow_it() -> None:
    strict = guard({"hooks.example.com": [PUBLIC]})
    assert "Only https" in refused(strict, "http://hooks.example.com/")
    relaxed = guard({"hooks.example.com": [PUBLIC]}, allow_http=True)
    assert relaxed.check("http://hooks.example.com/x").address == PUBLIC
    assert relaxed.resolver.asked == [("hooks.example.com", 80)]  # type: ignore[attr-defined]
    # http does not relax anything else
    assert "loopback" in refused(relaxed, "http://127.0.0.1:8003/internal")
    assert "Only https" in refused(relaxed, "ftp://hooks.example.com/")


@pytest.mark.parametrize(
    "answer",
    [OSError("Name or service not known"), UnicodeError("label too long"), [], ["not-an-ip"]],
)
def test_a_name_that_does_not_resolve_is_its_own_problem(answer: object) -> None:
    def resolver(host: str, port: int) -> Sequence[str]:
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    with pytest.raises(WebhookUrlUnresolvable) as caught:
        UrlGuard(resolver=resolver).check("https://gone.example.com/")
    assert (caught.value.status, caught.value.code) == (422, "webhook_url_unresolvable")
    assert "gone.example.com" in caught.value.detail


def test_allowed_networks_let_a_test_receiver_in_and_nothing_else() -> None:
    g = guard(
        {"localhost": ["127.0.0.1", "::1"], "v4only.localhost": ["127.0.0.1"]},
        allow_http=True,
        allowed_networks=[ipaddress.ip_network("127.0.0.1/32")],
    )
    assert g.check("http://127.0.0.1:18700/hooks").address == "127.0.0.1"
    assert g.check("http://[::ffff:127.0.0.1]:18700/").address == "::ffff:7f00:1"
    assert g.check("http://v4only.localhost:18700/").address == "127.0.0.1"
    # ::1 is outside the allowed network, so an internal name that may resolve to it is not
    assert "internal name" in refused(g, "http://localhost:18700/")
    assert "loopback" in refused(g, "http://127.0.0.2/")
    assert "link-local" in refused(g, "http://169.254.169.254/")
    assert "private" in refused(g, "http://10.0.0.1/")
    # nor does the allow-list lift the other rules
    assert "user name" in refused(g, "http://u:p@127.0.0.1/")


def test_a_private_network_can_be_allowed_for_development() -> None:
    g = guard(
        {"dev.example.com": ["10.20.0.5"]},
        allowed_networks=[ipaddress.ip_network("10.20.0.0/16")],
    )
    assert g.check("https://dev.example.com/").address == "10.20.0.5"
    assert "private" in refused(
        guard({"dev.example.com": ["10.20.0.5"]}), "https://dev.example.com/"
    )


def test_settings_default_to_strict_and_parse_networks_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CITYPARK_JWT_SECRET", "unit-secret-0123456789abcdefghij")
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (s.webhook_allow_http, s.webhook_allowed_networks) == (False, [])
    monkeypatch.setenv("CITYPARK_WEBHOOK_ALLOW_HTTP", "true")
    monkeypatch.setenv("CITYPARK_WEBHOOK_ALLOWED_NETWORKS", '["127.0.0.0/8", "::1/128"]')
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.webhook_allow_http is True
    assert s.webhook_allowed_networks == [
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    ]
    g = UrlGuard.from_settings(s, resolver=FakeDns())
    assert g.check("http://127.9.9.9/").address == "127.9.9.9"
    monkeypatch.setenv("CITYPARK_WEBHOOK_ALLOWED_NETWORKS", '["not-a-network"]')
    with pytest.raises(ValidationError):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_the_system_resolver_answers_addresses_for_a_literal() -> None:
    # A literal needs no DNS; this proves the getaddrinfo plumbing returns bare addresses.
    assert set(system_resolver("127.0.0.1", 443)) == {"127.0.0.1"}


def test_a_resolver_that_hangs_is_given_up_and_the_url_is_unresolvable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()

    def hanging(*args: Any, **kwargs: Any) -> Any:
        release.wait(5)
        raise OSError("never answered")

    monkeypatch.setattr(urlguard.socket, "getaddrinfo", hanging)
    try:
        started = time.monotonic()
        with pytest.raises(OSError, match="took longer"):
            system_resolver("slow.example.com", 443, timeout_s=0.2)
        assert time.monotonic() - started < 2
        slow = UrlGuard(resolver=lambda host, port: system_resolver(host, port, timeout_s=0.2))
        with pytest.raises(WebhookUrlUnresolvable):
            slow.check("https://slow.example.com/hook")
    finally:
        release.set()


# --- the channel: checked again before each send -------------------------------------------


def a_notification() -> Notification:
    return Notification(
        id="n-1",
        driver_id="d-1",
        kind="charge_captured",
        dedupe_key="k",
        title="t",
        body="b",
        plate=None,
        amount_fen=800,
        ref_id="c-1",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


class Recorder:
    def __init__(self, status: int = 204) -> None:
        self.requests: list[httpx.Request] = []
        self.status = status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, headers={"location": "https://10.0.0.1/"})


def channel(dns: FakeDns, recorder: Recorder) -> WebhookChannel:
    ch = WebhookChannel("platform-secret", UrlGuard(resolver=dns))
    ch.http = httpx.Client(transport=httpx.MockTransport(recorder), follow_redirects=False)
    return ch


def send(ch: WebhookChannel, target: str) -> None:
    ch.send(None, a_notification(), target)  # type: ignore[arg-type]  # the webhook needs no db


def test_the_channel_connects_to_the_checked_address_under_the_urls_name() -> None:
    dns, recorder = FakeDns({"hooks.example.com": [PUBLIC]}), Recorder()
    send(channel(dns, recorder), "wh-1 https://hooks.example.com:8443/p?q=1")
    [request] = recorder.requests
    assert str(request.url) == f"https://{PUBLIC}:8443/p?q=1"
    assert request.headers["host"] == "hooks.example.com:8443"
    assert request.extensions["sni_hostname"] == "hooks.example.com"
    assert json.loads(request.content)["data"]["amount_fen"] == 800


def test_a_name_rebound_to_an_internal_address_is_not_sent_to() -> None:
    dns, recorder = FakeDns({"hooks.example.com": [PUBLIC]}), Recorder()
    ch = channel(dns, recorder)
    send(ch, "wh-1 https://hooks.example.com/p")
    dns.table["hooks.example.com"] = ["169.254.169.254"]  # DNS changed after registration
    with pytest.raises(DeliveryFailed, match="webhook_url_forbidden.*link-local"):
        send(ch, "wh-1 https://hooks.example.com/p")
    del dns.table["hooks.example.com"]
    with pytest.raises(DeliveryFailed, match="webhook_url_unresolvable"):
        send(ch, "wh-1 https://hooks.example.com/p")
    # a URL stored before the guard existed is refused at send time too
    with pytest.raises(DeliveryFailed, match="webhook_url_forbidden"):
        send(ch, "wh-1 http://127.0.0.1:8003/internal/x")
    assert len(recorder.requests) == 1  # only the first, public, send went out


def test_a_redirect_is_a_failed_attempt_and_is_not_followed() -> None:
    dns, recorder = FakeDns({"hooks.example.com": [PUBLIC]}), Recorder(status=307)
    with pytest.raises(DeliveryFailed, match="307; redirects are not followed"):
        send(channel(dns, recorder), "wh-1 https://hooks.example.com/")
    assert len(recorder.requests) == 1


def test_the_real_client_follows_no_redirects_and_no_environment_proxy() -> None:
    ch = WebhookChannel("s", UrlGuard(resolver=FakeDns()))
    assert ch.http.follow_redirects is False
    assert ch.http.trust_env is False


def test_from_settings_defaults_to_https_only() -> None:
    s = Settings(jwt_secret=SecretStr("unit-secret-0123456789abcdefghij"), _env_file=None)  # type: ignore[call-arg]
    g = UrlGuard.from_settings(s, resolver=FakeDns({"hooks.example.com": [PUBLIC]}))
    assert g.check("https://hooks.example.com/").address == PUBLIC
    assert "Only https" in refused(g, "http://hooks.example.com/")
