"""A Debian 12 root booted with systemd as PID 1 (systemd-nspawn), for the install tests.

The roots come from ``debroot`` (built once, cached, keyed by what they are made of); each
test boots a copy: this machine's architecture, or a Raspberry Pi's under qemu-user. On this
machine kind nspawn boots only with ``--register=no --keep-unit`` (no D-Bus on the host);
commands go in with ``nsenter``, and the container shares the host's network.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from . import debroot


def unavailable(recipe: debroot.Recipe = debroot.NATIVE) -> str | None:
    """Why a booted container cannot be had here, or None."""
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt install systemd-container)"
    return debroot.unavailable(recipe)


def cached_root(recipe: debroot.Recipe = debroot.NATIVE) -> Path:
    return debroot.cached_root(recipe)


class Machine:
    """A booted copy of the root; ``run`` executes in it as root."""

    def __init__(
        self, root: Path, binds: list[str], recipe: debroot.Recipe = debroot.NATIVE
    ) -> None:
        self.root = root
        self.recipe = recipe
        self.log = root.parent / "nspawn.log"
        self._log = self.log.open("wb")
        setenv = [f"--setenv=QEMU_CPU={recipe.qemu_cpu}"] if recipe.qemu_cpu else []
        self.proc = subprocess.Popen(
            [
                "systemd-nspawn", "-D", str(root), "-b", "--register=no", "--keep-unit",
                *setenv, *(f"--bind={b}" for b in binds),
            ],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.leader = self._find_init()

    def _find_init(self) -> int:
        deadline = time.monotonic() + (180 if self.recipe.foreign else 60)
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
            env=self._env(),
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{command!r} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def _env(self) -> dict[str, str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
        if self.recipe.qemu_cpu:
            env["QEMU_CPU"] = self.recipe.qemu_cpu
        return env

    def wait_booted(self) -> None:
        # On a loaded machine systemd may not have opened its bus yet: ask again until it has.
        patience = 600 if self.recipe.foreign else 120
        deadline = time.monotonic() + patience
        while True:
            state = self.run("systemctl is-system-running --wait", timeout=patience, check=False)
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
def booted(
    work: Path, binds: list[str], recipe: debroot.Recipe = debroot.NATIVE
) -> Iterator[Machine]:
    """A fresh copy of the cached root, booted; shut down and removed afterwards."""
    root = work / "root"
    subprocess.run(
        ["cp", "-a", "--reflink=auto", str(cached_root(recipe)), str(root)],
        check=True, timeout=600,
    )  # fmt: skip
    try:
        machine = Machine(root, binds, recipe)
        try:
            machine.wait_booted()
            yield machine
        finally:
            machine.close()
    finally:
        debroot.remove(root)
