"""Device health for the metrics message. Sensors that do not exist are omitted, never zero."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

SYS = Path("/sys")
PROC = Path("/proc")
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


def throttling() -> dict[str, dict[str, bool]] | None:
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
    throttled = throttling()
    if throttled is not None:
        health["throttled"] = throttled
    with contextlib.suppress(OSError):
        health["load"] = [round(x, 2) for x in os.getloadavg()]
    mem = memory(proc_root)
    if mem is not None:
        health["memory"] = mem
    if state_dir is not None:
        try:
            usage = shutil.disk_usage(state_dir)
            health["disk_free_bytes"] = usage.free
        except OSError:
            pass
    rss = _read(proc_root / "self" / "status")
    if rss:
        for line in rss.splitlines():
            if line.startswith("VmRSS:"):
                health["rss_bytes"] = int(line.split()[1]) * 1024
    return health
