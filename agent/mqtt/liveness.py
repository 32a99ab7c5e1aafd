"""How the link tells a broker that is gone from one that is quiet, and says why it failed.

A half-open link (a dead access point, a NAT that forgot the connection): the socket stays
open, the kernel sends, nothing comes back. paho notices only 1.5-2 keepalive intervals
after the last byte; ``silence`` has a PINGREQ sent after half an interval of silence and
gives the connection up after a whole one (13-14 s before, 10-10.5 s with a 10 s keepalive),
so what the outbox holds goes out again sooner. It reads paho's own clock of the last byte
received (``_last_bytes_received``, paho 2.x; without it paho's keepalive alone applies).
"""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt

# OpenSSL's verify codes for a certificate outside its validity period.
CERT_NOT_YET_VALID, CERT_EXPIRED = 9, 10


def unreachable_reason(exc: BaseException) -> str:
    """Why a connection could not be made, in words that say what to do."""
    code = getattr(exc, "verify_code", None)
    if code in (CERT_NOT_YET_VALID, CERT_EXPIRED):
        now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        when = "is not valid yet" if code == CERT_NOT_YET_VALID else "has expired"
        return (
            f"the broker's TLS certificate {when} by this device's clock ({now}): is the "
            "clock set? A Pi has no RTC and needs NTP first; retrying"
        )
    return f"broker unreachable: {exc}"


def silence(client: mqtt.Client, keepalive_s: float) -> str | None:
    """Why the connection should be given up (nothing heard for ``keepalive_s``), or None;
    after half of it without a byte, a PINGREQ asks the broker to say something."""
    heard = getattr(client, "_last_bytes_received", None)
    if not isinstance(heard, float):
        return None
    silent = time.monotonic() - heard
    if silent >= keepalive_s:
        return f"nothing from the broker for {silent:.1f} s (half-open link?)"
    if silent >= keepalive_s / 2 and getattr(client, "_ping_t", None) == 0:
        ping = getattr(client, "_send_pingreq", None)
        if callable(ping):
            ping()  # answered by a PINGRESP (whose bytes count) if anyone is there
    return None
