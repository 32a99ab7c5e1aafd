"""A Debian 12 root booted with systemd as PID 1 (systemd-nspawn), for the install test.

The root is built once with debootstrap and cached, keyed by what it is made of, under
``$EDGEFLEET_CACHE`` (default ``~/.cache/edgefleet``); each test boots a copy. On this
machine kind nspawn boots only with ``--register=no --keep-unit`` (no D-Bus on the host);
commands go in with ``nsenter``, and the container shares the host's network.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates"]
CACHE = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet"))


def unavailable() -> str | None:
    """Why a booted container cannot be had here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt install systemd-container debootstrap)"
    return None


def cached_root() -> Path:
    """The cached root for this recipe, built when missing (a few minutes, once)."""
    key = hashlib.sha256("|".join([SUITE, MIRROR, *PACKAGES]).encode()).hexdigest()[:12]
    root = CACHE / f"debian-{SUITE}-{key}"
    if (root / ".complete").exists():
        return root
    building = root.with_name(root.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
            SUITE, str(building), MIRROR,
        ],
        check=True, capture_output=True, timeout=1800,
    )  # fmt: skip
    (building / "etc" / "hostname").write_text("edgefleet-test\n")
    (building / ".complete").write_text(key)
    shutil.rmtree(root, ignore_errors=True)
    building.rename(root)
    return root


class Machine:
    """A booted copy of the root; ``run`` executes in it as root."""

    def __init__(self, root: Path, binds: list[str]) -> None:
        self.root = root
        self.log = root.parent / "nspawn.log"
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                "systemd-nspawn", "-D", str(root), "-b", "--register=no", "--keep-unit",
                *(f"--bind={b}" for b in binds),
            ],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.leader = self._find_init()

    def _find_init(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
            children = subprocess.run(
                ["ps", "-o", "pid=,comm=", "--ppid", str(self.proc.pid)],
                capture_output=True, text=True, check=False,
            ).stdout.split()  # fmt: skip
            if len(children) >= 2 and children[1] == "systemd":
                return int(children[0])
            time.sleep(0.2)
        raise AssertionError("the container's systemd did not start")

    def run(
        self, command: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "/bin/bash", "-c", command],
            capture_output=True, text=True, timeout=timeout, check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{command!r} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def wait_booted(self) -> None:
        # On a loaded machine systemd may not have opened its bus yet: ask again until it has.
        deadline = time.monotonic() + 120
        while True:
            state = self.run("systemctl is-system-running --wait", timeout=120, check=False)
            not_yet = "Failed to connect to bus" in state.stdout + state.stderr
            if not not_yet or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert state.stdout.strip() in ("running", "degraded"), state.stdout + state.stderr

    def close(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired, AssertionError):
            self.run("systemctl poweroff", timeout=10, check=False)
            self.proc.wait(30)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@contextlib.contextmanager
def booted(work: Path, binds: list[str]) -> Iterator[Machine]:
    """A fresh copy of the cached root, booted; shut down and removed afterwards."""
    root = work / "root"
    subprocess.run(
        ["cp", "-a", "--reflink=auto", str(cached_root()), str(root)], check=True, timeout=600
    )
    machine = Machine(root, binds)
    try:
        machine.wait_booted()
        yield machine
    finally:
        machine.close()
        shutil.rmtree(root, ignore_errors=True)
