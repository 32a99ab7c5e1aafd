"""Debian 12 roots for the tests: this machine's architecture, or a Raspberry Pi's under qemu.

A root is built once with debootstrap (and apt for the packages debootstrap cannot resolve)
and cached under ``$EDGEFLEET_CACHE`` (default ``~/.cache/edgefleet``), keyed by everything
it is made of; each test works on a copy. ARM roots run through ``qemu-user-static`` and
binfmt_misc (``F`` flag: the interpreter is opened when registered, so it works inside a
root and a container):

* Debian 12's qemu 7.2 shows a guest the host's x86 ``/proc/cpuinfo``, on which LiteRT's
  cpuinfo library crashes: each ARM root carries a Raspberry Pi's (``etc/cpuinfo-pi``),
  bind-mounted over ``/proc/cpuinfo`` in a chroot by ``chrooted`` and in a booted container
  by a mount unit of the root (``proc-cpuinfo.mount``);
* qemu's default CPU (``max``, with SME) breaks XNNPACK's int8 kernels (every photo gets the
  same answer): commands run under a Pi's CPU model (``QEMU_CPU``: Cortex-A72 as in a Pi 4;
  for 32-bit code Cortex-A15, the nearest ARMv7 model qemu-arm 7.2 has).

Mounts made for a chroot are undone in every exit path before the copy is deleted, and the
copy is deleted with ``rm --one-file-system``: a recursive delete through a bind of the
host's /dev or /proc would reach the host's own files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
CACHE = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet"))
BASE = ["systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates"]
RECIPE_VERSION = "2"  # bump when the way a root is made changes

PI4_CPUINFO_64 = """\
processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3
"""
PI4_CPUINFO_32 = """\
processor\t: {n}
model name\t: ARMv7 Processor rev 3 (v7l)
BogoMIPS\t: 108.00
Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32
CPU implementer\t: 0x41
CPU architecture: 7
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3
"""
PI4_FOOTER = "Hardware\t: BCM2835\nRevision\t: c03114\nSerial\t\t: 100000000b8a3c42\n"
PI4_FOOTER += "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
CPUINFO_UNIT = """\
[Unit]
Description=A Raspberry Pi's /proc/cpuinfo (qemu-user shows the host's)
DefaultDependencies=no
Before=sysinit.target

[Mount]
What=/etc/cpuinfo-pi
Where=/proc/cpuinfo
Type=none
Options=bind,ro

[Install]
WantedBy=sysinit.target
"""


@dataclass(frozen=True)
class Recipe:
    """What one root is made of."""

    arch: str  # a Debian architecture
    packages: tuple[str, ...] = tuple(BASE)
    extra: tuple[str, ...] = ()  # installed with apt after debootstrap (virtual packages)
    qemu_cpu: str | None = None
    cpuinfo: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        parts = [RECIPE_VERSION, SUITE, MIRROR, self.arch, *self.packages, "|", *self.extra]
        parts += [self.cpuinfo or "", CPUINFO_UNIT if self.cpuinfo else "", self.qemu_cpu or ""]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]

    @property
    def foreign(self) -> bool:
        return self.arch != native_arch()


def _cpuinfo(template: str, cores: int = 4) -> str:
    return "\n".join(template.format(n=n) for n in range(cores)) + "\n" + PI4_FOOTER


def native_arch() -> str:
    out = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or "amd64"


NATIVE = Recipe(native_arch())
# A Pi 4 with 64-bit Raspberry Pi OS; Debian's numpy and apt's Python module beside the venv
# (the venv's own numpy must win; an apt-only module must still import).
PI_ARM64 = Recipe(
    "arm64",
    extra=("python3-numpy", "python3-apt"),
    qemu_cpu="cortex-a72",
    cpuinfo=_cpuinfo(PI4_CPUINFO_64),
)
# 32-bit Raspberry Pi OS: OpenCV, numpy, PyYAML and cffi come from Debian (no armv7l wheels).
PI_ARMHF = Recipe(
    "armhf",
    extra=("python3-numpy", "python3-opencv", "python3-yaml", "python3-cffi", "python3-apt"),
    qemu_cpu="cortex-a15",
    cpuinfo=_cpuinfo(PI4_CPUINFO_32),
)


def unavailable(recipe: Recipe) -> str | None:
    """Why this root cannot be had here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("debootstrap", "chroot", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt install debootstrap)"
    if recipe.foreign:
        qemu = {"arm64": "aarch64", "armhf": "arm"}[recipe.arch]
        entry = Path(f"/proc/sys/fs/binfmt_misc/qemu-{qemu}")
        if not entry.exists():
            return (
                f"no binfmt_misc entry for {qemu} (apt install qemu-user-static binfmt-support; "
                "./dev test registers them)"
            )
        flags = [line for line in entry.read_text().splitlines() if line.startswith("flags:")]
        if not flags or "F" not in flags[0]:
            return f"binfmt entry qemu-{qemu} lacks the F flag (it cannot run inside a root)"
    return None


def run_in(root: Path, recipe: Recipe, command: str, timeout: float = 600) -> str:
    """``command`` (bash) chrooted in ``root``; its output; AssertionError when it fails."""
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    env += ["HOME=/root", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive"]
    if recipe.qemu_cpu:
        env.append(f"QEMU_CPU={recipe.qemu_cpu}")
    env += [f"{k}={v}" for k, v in recipe.env.items()]
    proc = subprocess.run(
        ["chroot", str(root), "/usr/bin/env", "-i", *env, "/bin/bash", "-c", command],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"{command!r} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def cached_root(recipe: Recipe) -> Path:
    """The cached root for ``recipe``, built when missing (minutes, once)."""
    root = CACHE / f"debian-{SUITE}-{recipe.arch}-{recipe.key}"
    if (root / ".complete").exists():
        return root
    building = root.with_name(root.name + ".building")
    remove(building)
    building.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "debootstrap", f"--arch={recipe.arch}", "--variant=minbase",
            f"--include={','.join(recipe.packages)}", SUITE, str(building), MIRROR,
        ],
        check=True, capture_output=True, timeout=3600,
    )  # fmt: skip
    (building / "etc" / "hostname").write_text("edgefleet-test\n")
    if recipe.cpuinfo:
        (building / "etc" / "cpuinfo-pi").write_text(recipe.cpuinfo)
        units = building / "etc" / "systemd" / "system"
        (units / "proc-cpuinfo.mount").write_text(CPUINFO_UNIT)
        wants = units / "sysinit.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / "proc-cpuinfo.mount").symlink_to("../proc-cpuinfo.mount")
    if recipe.qemu_cpu:
        # Services get a clean environment: every process systemd starts needs the CPU model.
        conf = building / "etc" / "systemd" / "system.conf.d"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "50-qemu-cpu.conf").write_text(
            f"[Manager]\nDefaultEnvironment=QEMU_CPU={recipe.qemu_cpu}\n"
        )
    if recipe.extra:
        with chrooted(building, recipe, copy=False) as inside:
            inside.run(f"apt-get update -qq && apt-get install -y -qq {' '.join(recipe.extra)}")
            inside.run("apt-get clean && rm -rf /var/lib/apt/lists/*")
    (building / ".complete").write_text(recipe.key)
    remove(root)
    building.rename(root)
    return root


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = str(path.resolve())
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def remove(path: Path) -> None:
    """Delete a root: its mounts undone first, never crossing into another file system."""
    if not path.exists():
        return
    for _ in range(3):
        for point in mounts_under(path):
            subprocess.run(["umount", point], capture_output=True, check=False)
        if not mounts_under(path):
            break
        time.sleep(0.5)
    for point in mounts_under(path):  # still busy: detach, it goes when its last user does
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    left = mounts_under(path)
    if left:
        raise AssertionError(f"refusing to delete {path}: still mounted: {left}")
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True, timeout=600)


@dataclass
class Chroot:
    root: Path
    recipe: Recipe

    def run(self, command: str, timeout: float = 600) -> str:
        return run_in(self.root, self.recipe, command, timeout)


@contextlib.contextmanager
def chrooted(
    source: Path,
    recipe: Recipe,
    work: Path | None = None,
    binds: dict[Path, str] | None = None,
    copy: bool = True,
) -> Iterator[Chroot]:
    """A root (a copy of ``source`` under ``work``, or ``source`` itself) with /proc, /sys,
    the Pi's cpuinfo, the host's DNS and CA bundle, and ``binds`` (host path -> path in the
    root); everything undone, and the copy deleted, on the way out."""
    root = source
    if copy:
        if work is None:
            raise ValueError("a copy needs a work folder")
        root = work / "root"
        subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(root)], check=True)
    try:
        for name in ("resolv.conf", "ssl/certs/ca-certificates.crt"):
            host = Path("/etc") / name
            if host.exists():  # this machine's: its network may intercept TLS
                target = root / "etc" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                shutil.copyfile(host, target)
        _mount(["-t", "proc", "proc"], root / "proc")
        _mount(["-t", "sysfs", "-o", "ro", "sysfs"], root / "sys")
        if recipe.cpuinfo:
            _mount(["--bind", "-o", "ro", str(root / "etc" / "cpuinfo-pi")], root / "proc/cpuinfo")
        for host_path, inside in (binds or {}).items():
            target = root / inside.lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            _mount(["--bind", str(host_path)], target)
        yield Chroot(root, recipe)
    finally:
        if copy:
            remove(root)
        else:
            for point in mounts_under(root):
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _mount(args: list[str], target: Path) -> None:
    subprocess.run(["mount", *args, str(target)], check=True, capture_output=True)


def copy_checkout(repo: Path, dest: Path) -> None:
    """The files git tracks (and new ones it does not ignore), as they are now."""
    names = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=repo, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    for name in names:
        source = repo / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            target.chmod(source.stat().st_mode & 0o777)
