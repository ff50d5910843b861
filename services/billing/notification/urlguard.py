"""Webhook URLs may only reach the public internet.

A driver chooses the URL and the platform POSTs to it from inside the city's network, so an
unchecked URL would let anyone make billing call its own internal API, the cloud metadata
service (169.254.169.254, 100.100.100.200) or any private host. `UrlGuard.check` refuses:

- any scheme but `https` (`http` only where settings allow it, for development and tests);
- credentials in the URL;
- internal host names (one label such as `localhost` or a service name, or `.local`,
  `.internal`, `.localhost` …);
- an IP literal: a webhook is registered by name (an address inside an allowed network aside);
- a name that resolves to any loopback, private, link-local, multicast, reserved, unspecified
  or otherwise non-public address, IPv4 or IPv6, including IPv6 forms that embed an IPv4
  address (`::ffff:127.0.0.1`, 6to4).

It runs at registration and again before every send, because DNS can change after the URL
was accepted; the sender then connects to the address that was checked (see `Target`), so a
second lookup between the check and the connection cannot swap it. Resolution is injected
(`Resolver`) so the rules are tested without DNS.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import httpx

from shared.errors import problem
from shared.runtime import Runtime
from shared.settings import Settings

WebhookUrlForbidden = problem(422, "webhook_url_forbidden", "The webhook URL may not be used")
WebhookUrlUnresolvable = problem(
    422, "webhook_url_unresolvable", "The webhook URL's host name does not resolve"
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses a connection could go to; raises OSError when it cannot tell.
Resolver = Callable[[str, int], Sequence[str]]

# A `Resolver` in `Runtime.providers` under this name replaces the system's (tests).
RESOLVER_PROVIDER = "notification.webhook_resolver"
DEFAULT_PORTS = {"http": 80, "https": 443}
# Names that only mean something inside a network (RFC 6761, 6762, 8375 and common habit).
INTERNAL_SUFFIXES = (
    "localhost",
    "local",
    "localdomain",
    "internal",
    "intranet",
    "lan",
    "home.arpa",
    "corp",
)


RESOLVE_TIMEOUT_S = 3.0
# getaddrinfo has no timeout of its own and a slow DNS server would hold the request (or the
# delivery worker) for as long as it likes; lookups run here and are given up after a while.
_lookups = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook-dns")


def system_resolver(host: str, port: int, timeout_s: float = RESOLVE_TIMEOUT_S) -> list[str]:
    lookup = _lookups.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = lookup.result(timeout=timeout_s)
    except FutureTimeout as exc:
        raise OSError(f"resolving {host!r} took longer than {timeout_s} s") from exc
    return [str(info[4][0]) for info in infos]


def non_public_reason(address: IPAddress) -> str | None:
    """Why an address may not receive webhooks (None: it is a public address)."""
    if isinstance(address, ipaddress.IPv6Address):
        # The IPv4 address an IPv6 form carries is where the packets would end up.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return non_public_reason(embedded)
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        # e.g. 100.64.0.0/10, carrier and cloud internal space (Alibaba Cloud's metadata)
        return "a non-public address"
    return None


@dataclass(frozen=True)
class Target:
    """A URL that passed the check, and the address it was checked at."""

    url: str
    host: str  # the ASCII (IDNA) host name, or the IP literal
    address: str  # connect here, never to a fresh lookup of `host`


class UrlGuard:
    def __init__(
        self,
        *,
        allow_http: bool = False,
        allowed_networks: Iterable[IPNetwork] = (),
        resolver: Resolver = system_resolver,
    ) -> None:
        self.allow_http = allow_http
        self.allowed_networks = tuple(allowed_networks)
        self.resolver = resolver

    @classmethod
    def from_settings(cls, settings: Settings, resolver: Resolver | None = None) -> UrlGuard:
        return cls(
            allow_http=settings.webhook_allow_http,
            allowed_networks=settings.webhook_allowed_networks,
            resolver=resolver or system_resolver,
        )

    @classmethod
    def from_runtime(cls, rt: Runtime) -> UrlGuard:
        return cls.from_settings(rt.settings, rt.providers.get(RESOLVER_PROVIDER))

    def allowed(self, address: IPAddress) -> bool:
        candidates: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        return any(a in net for a in candidates for net in self.allowed_networks)

    def check(self, url: str) -> Target:
        """The target to connect to; raises `WebhookUrlForbidden` or `WebhookUrlUnresolvable`."""
        try:
            parsed = httpx.URL(url)
            host = parsed.raw_host.decode("ascii").lower().rstrip(".")
        except (httpx.InvalidURL, UnicodeError) as exc:
            raise WebhookUrlForbidden("The webhook URL cannot be parsed") from exc
        schemes = ("https", "http") if self.allow_http else ("https",)
        if parsed.scheme not in schemes:
            raise WebhookUrlForbidden("Only https webhook URLs are accepted")
        if parsed.userinfo:
            raise WebhookUrlForbidden("A webhook URL may not carry a user name or password")
        if not host:
            raise WebhookUrlForbidden("The webhook URL has no host")
        port = parsed.port or DEFAULT_PORTS[parsed.scheme]

        literal = _ip(host)
        if literal is not None:
            if self.allowed(literal):
                return Target(url, host, str(literal))
            what = non_public_reason(literal) or "an IP address"
            raise WebhookUrlForbidden(
                f"The webhook host is {what}; register a public host name instead"
            )

        internal = "." not in host or any(
            host == s or host.endswith("." + s) for s in INTERNAL_SUFFIXES
        )
        if internal and not self.allowed_networks:
            # Refused by name alone: no lookup of an internal name leaves this process.
            raise WebhookUrlForbidden(
                f"The webhook host {host!r} is an internal name; register a public host name"
            )

        try:
            resolved = [_ip(a) for a in self.resolver(host, port)]
        except (OSError, UnicodeError) as exc:
            raise WebhookUrlUnresolvable(f"The webhook host {host!r} does not resolve") from exc
        if not resolved or any(a is None for a in resolved):
            raise WebhookUrlUnresolvable(f"The webhook host {host!r} does not resolve")
        addresses = [a for a in resolved if a is not None]
        for address in addresses:
            if self.allowed(address):
                continue
            if internal:
                raise WebhookUrlForbidden(
                    f"The webhook host {host!r} is an internal name; register a public host name"
                )
            reason = non_public_reason(address)
            if reason is not None:
                # Which address is not said: it would map the city's internal DNS for anyone.
                raise WebhookUrlForbidden(
                    f"The webhook host {host!r} resolves to {reason}; only public internet "
                    "addresses receive webhooks"
                )
        return Target(url, host, str(addresses[0]))


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
