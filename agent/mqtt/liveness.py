"""How the link tells a broker that is gone from one that is quiet, and says why it failed.

A half-open link (a dead access point, a NAT that forgot the connection): the socket stays
open, the kernel sends, nothing comes back. paho notices only 1.5-2 keepalive intervals
after the last byte; ``silence`` has a PINGREQ sent after half an interval of silence and
gives the connection up after a whole one (13-14 s before, 10-10.5 s with a 10 s keepalive),
so what the outbox holds goes out again sooner.

The clock of the last byte heard is the link's own (set when a read finds the socket
readable), not paho's ``_last_bytes_received``: paho 2.2 sets that one to "now" when its
keepalive check finds nothing sent for an interval, so a link that has gone quiet both
ways looked heard from and a cut went unnoticed for 1.5 intervals (seen in CI, 2026-12-07).
The PINGREQ is paho's own (``_send_pingreq``, guarded: without it paho's keepalive alone
applies, as giving up a quiet link that was never asked to answer would be wrong).
"""

from __future__ import annotations

import re
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


def same_reason(reason: str, before: str) -> bool:
    """The same failure as ``before``, whatever its numbers say: a reason that carries the
    clock's minute (a certificate not valid yet) is still the one already logged."""
    return re.sub(r"\d+", "#", reason) == re.sub(r"\d+", "#", before)


def silence(client: mqtt.Client, heard_at: float, keepalive_s: float) -> str | None:
    """Why the connection should be given up (nothing heard since ``heard_at``, a monotonic
    time, for ``keepalive_s``), or None; after half of it, a PINGREQ asks the broker to say
    something."""
    ping = getattr(client, "_send_pingreq", None)
    if not callable(ping):
        return None
    silent = time.monotonic() - heard_at
    if silent >= keepalive_s:
        return f"nothing from the broker for {silent:.1f} s (half-open link?)"
    if silent >= keepalive_s / 2 and getattr(client, "_ping_t", None) == 0:
        ping()  # answered by a PINGRESP (whose bytes count) if anyone is there
    return None
