"""Sign-in abuse limits, counted in the cache (Redis in the real topology, so every billing
replica shares the counts; in-process in the embedded city).

* Every request to `POST /v1/auth/otp` and `POST /v1/auth/token` counts against its client
  address (`signin_ip_limit` per `signin_window_s`) and then against the whole city
  (`signin_global_limit` per window); past either, 429 `signin_rate_limited` with
  `Retry-After`. A request refused for its address does not count for the city, so one address
  can use at most its own share of the city-wide budget.
* Codes sent to one phone: at most `CODES_PER_PHONE_AND_ADDRESS` an hour for each client
  address, and `CODES_PER_PHONE` an hour from all addresses together (a ceiling against SMS
  flooding); past either, 429 `otp_rate_limited` with `Retry-After`. Keyed by address, so an
  attacker hammering someone's phone exhausts only their own share: the owner still gets a
  code from their own address unless the attacker uses `CODES_PER_PHONE /
  CODES_PER_PHONE_AND_ADDRESS` addresses, and then until the end of the hour at most.
* Wrong guesses lock only the code they were made against, and a code can be used only from
  the address that asked for it (see `origin_tag`), so nobody can burn someone else's code.

The client address is `shared.forwarding.client_address`: the gateway's `x-forwarded-for`
when the gateway proves it set it, otherwise the TCP peer. Phones and addresses appear in the
cache only as keyed hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import math

import redis

from shared.cache import count_in_window
from shared.errors import problem
from shared.keys import Purpose, derive
from shared.settings import Settings

SigninRateLimited = problem(429, "signin_rate_limited", "Too many sign-in requests")
OtpRateLimited = problem(429, "otp_rate_limited", "Too many codes for this phone")

CODES_PER_PHONE_AND_ADDRESS = 5
CODES_PER_PHONE = 20
CODE_WINDOW_S = 3600
PREFIX = "citypark:signin"


def keyed(secret: str, purpose: str, value: str, length: int = 16) -> str:
    """A short keyed hash: stable for one secret, says nothing about `value` without it."""
    key = derive(secret, Purpose.signin_tags)  # `secret` is the master secret
    mac = hmac.new(key, f"signin-{purpose}:{value}".encode(), hashlib.sha256)
    return mac.hexdigest()[:length]


def origin_tag(secret: str, address: str) -> str:
    """Marks the codes asked for from one address (the head of the challenge's id)."""
    return keyed(secret, "origin", address, 12)


def _seconds(left: float) -> int:
    return max(1, math.ceil(left))  # never 0: "now" would be a lie


def admit(r: redis.Redis, settings: Settings, secret: str, address: str) -> None:
    """Count one sign-in request; raises `SigninRateLimited` past the address's or the city's
    budget for this window."""
    window = settings.signin_window_s
    count, left = count_in_window(r, f"{PREFIX}:ip:{keyed(secret, 'ip', address)}", window)
    if count > settings.signin_ip_limit:
        seconds = _seconds(left)
        raise SigninRateLimited(
            f"At most {settings.signin_ip_limit} sign-in requests from one address every "
            f"{window} s; retry after {seconds} s",
            retry_after_s=seconds,
        )
    count, left = count_in_window(r, f"{PREFIX}:all", window)
    if count > settings.signin_global_limit:
        seconds = _seconds(left)
        raise SigninRateLimited(
            f"The city is taking too many sign-ins; retry after {seconds} s",
            retry_after_s=seconds,
        )


def allow_code(r: redis.Redis, secret: str, phone: str, address: str) -> None:
    """Count one code sent to `phone` for `address`; raises `OtpRateLimited` past either
    per-phone budget. The address's own share is checked first, so an address that is over it
    does not use up the phone's ceiling."""
    phone_key = keyed(secret, "phone", phone)
    mine, left = count_in_window(
        r, f"{PREFIX}:code:{phone_key}:{keyed(secret, 'ip', address)}", CODE_WINDOW_S
    )
    if mine > CODES_PER_PHONE_AND_ADDRESS:
        seconds = _seconds(left)
        raise OtpRateLimited(
            f"At most {CODES_PER_PHONE_AND_ADDRESS} codes an hour for one phone from one "
            f"address; retry after {seconds} s",
            retry_after_s=seconds,
        )
    everyone, left = count_in_window(r, f"{PREFIX}:code:{phone_key}", CODE_WINDOW_S)
    if everyone > CODES_PER_PHONE:
        seconds = _seconds(left)
        raise OtpRateLimited(
            f"At most {CODES_PER_PHONE} codes an hour for one phone; retry after {seconds} s",
            retry_after_s=seconds,
        )
