"""Device health for the metrics message. Sensors that do not exist are omitted, never zero.

On a Raspberry Pi the firmware's throttling flags (under-voltage, frequency capped,
throttled, soft temperature limit; now and since boot) come from the kernel's
``get_throttled`` file when it has one (Raspberry Pi OS kernels 5.x and later, no subprocess)
or else from ``vcgencmd get_throttled``; the SoC temperature from its thermal zone. Every
reading is a file read or a subprocess with a short timeout on the outbox thread, never on
the classification loop, so a slow, throttled board cannot stall what the watchdog watches.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

SYS = Path("/sys")
PROC = Path("/proc")
# Where Raspberry Pi kernels expose the firmware's throttled bits (hex, as vcgencmd prints).
THROTTLED_FILES = (
    "devices/platform/soc/soc:firmware/get_throttled",
    "devices/platform/soc/soc:firmware/raspberrypi-hwmon/get_throttled",
)
# vcgencmd get_throttled bits: 0-3 now, 16-19 since boot.
THROTTLE_BITS = {
    0: "under_voltage",
    1: "arm_frequency_capped",
    2: "throttled",
    3: "soft_temperature_limit",
}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_temperature_c(sys_root: Path = SYS) -> float | None:
    zones = sorted((sys_root / "class" / "thermal").glob("thermal_zone*"))
    preferred = [z for z in zones if (_read(z / "type") or "").startswith(("cpu", "soc", "x86"))]
    for zone in preferred or zones:
        raw = _read(zone / "temp")
        if raw and raw.lstrip("-").isdigit():
            return round(int(raw) / 1000.0, 1)
    return None


def coral_temperatures_c(sys_root: Path = SYS) -> dict[str, float]:
    temps = {}
    for apex in sorted((sys_root / "class" / "apex").glob("apex_*")):
        raw = _read(apex / "temp")
        if raw and raw.isdigit():
            temps[apex.name] = round(int(raw) / 1000.0, 1)
    return temps


def parse_throttled(text: str) -> dict[str, dict[str, bool]] | None:
    """``throttled=0x50005`` -> flags now and since boot."""
    _, _, value = text.strip().partition("=")
    try:
        bits = int(value, 16)
    except ValueError:
        return None
    return {
        "now": {name: bool(bits >> bit & 1) for bit, name in THROTTLE_BITS.items()},
        "since_boot": {name: bool(bits >> (bit + 16) & 1) for bit, name in THROTTLE_BITS.items()},
    }


def throttling(sys_root: Path = SYS) -> dict[str, dict[str, bool]] | None:
    for name in THROTTLED_FILES:
        raw = _read(sys_root / name)
        if raw:
            return parse_throttled("throttled=0x" + raw.removeprefix("0x"))
    exe = shutil.which("vcgencmd")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "get_throttled"], capture_output=True, text=True, timeout=2, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_throttled(out.stdout) if out.returncode == 0 else None


TIMESYNC_MARK = Path("/run/systemd/timesync/synchronized")  # systemd-timesyncd, >= 249
TIME_ERROR = 5  # adjtimex(): the kernel's clock is not synchronised


def clock_synced(mark: Path = TIMESYNC_MARK) -> bool | None:
    """Whether the wall clock was set by NTP: a Pi has no RTC and boots with the time it
    last saved (or 1970). systemd-timesyncd's mark, else the kernel's own flag (adjtimex,
    read only); None when neither can tell (the unit's ProtectClock refuses adjtimex)."""
    if mark.exists():
        return True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        timex = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
        state = int(libc.adjtimex(timex))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != TIME_ERROR


def uptime_s(proc_root: Path = PROC) -> float | None:
    raw = _read(proc_root / "uptime")
    try:
        return round(float(raw.split()[0]), 1) if raw else None
    except ValueError:
        return None


def memory(proc_root: Path = PROC) -> dict[str, int] | None:
    text = _read(proc_root / "meminfo")
    if text is None:
        return None
    fields = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            fields[key] = int(rest.split()[0]) * 1024
    if len(fields) != 2:
        return None
    return {"total_bytes": fields["MemTotal"], "available_bytes": fields["MemAvailable"]}


def collect(
    state_dir: Path | None = None, sys_root: Path = SYS, proc_root: Path = PROC
) -> dict[str, Any]:
    """Everything measurable here, as a JSON-able dict without absent sensors."""
    health: dict[str, Any] = {}
    temp = cpu_temperature_c(sys_root)
    if temp is not None:
        health["cpu_temp_c"] = temp
    coral = coral_temperatures_c(sys_root)
    if coral:
        health["coral_temp_c"] = coral
    throttled = throttling(sys_root)
    if throttled is not None:
        health["throttled"] = throttled
    with contextlib.suppress(OSError):
        health["load"] = [round(x, 2) for x in os.getloadavg()]
    mem = memory(proc_root)
    if mem is not None:
        health["memory"] = mem
    uptime = uptime_s(proc_root)
    if uptime is not None:
        health["uptime_s"] = uptime
    synced = clock_synced()
    if synced is not None:
        health["clock_synced"] = synced
    if state_dir is not None:
        try:
            usage = shutil.disk_usage(state_dir)
            health["disk_free_bytes"] = usage.free
            health["disk_total_bytes"] = usage.total
        except OSError:
            pass
    rss = _read(proc_root / "self" / "status")
    if rss:
        for line in rss.splitlines():
            if line.startswith("VmRSS:"):
                health["rss_bytes"] = int(line.split()[1]) * 1024
    return health
