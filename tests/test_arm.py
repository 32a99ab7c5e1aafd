"""Raspberry Pi OS in emulation: the install a Pi user runs, on arm64 and armhf roots.

Debian 12 roots of the Pi's architectures (``debroot``: debootstrap once, cached) run under
qemu-user with a Pi 4's CPU model and /proc/cpuinfo. Each test installs this checkout with
``systemd/install.sh`` as docs/raspberry-pi.md tells a user, then checks what a user relies
on against this machine (x86) as the reference:

* arm64, booted with systemd as PID 1 (nspawn): the service becomes active, reports reach a
  broker on the host, a signed rollout of the float model converges; the venv sees Debian's
  own modules (apt_pkg) while its numpy is the venv's;
* armhf (32-bit Pi OS), in a chroot: the install takes OpenCV, numpy, PyYAML and cffi from
  Debian and tflite-runtime 2.14 as the runtime; ``run`` reports to the host's broker;
* on both, ``classify`` gives this machine's top-1 on every photo (int8 factory model and the
  float model), and each photo's input tensor is byte for byte the one made here.

Emulation proves function, never speed. Marked ``slow`` and ``arm`` (``-m "not arm"`` skips
them); skipped, with the reason, where roots, qemu-user-static or binfmt cannot be had.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from . import debroot, nspawn
from .conftest import REPO, SHARED, cli_command
from .mqtt_helpers import Broker, Subscriber, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.arm]

FLOAT_MODEL = REPO / "models" / "efficientnet-lite0-fp32.tflite"
# A reference run of this module's digest script: the same code path as the agent's loop.
DIGEST = """\
import hashlib, sys
from pathlib import Path
from edgefleet.inference.classifier import inspect_model
from edgefleet.inference.images import decode_image
clf = inspect_model(Path(sys.argv[1]))
for name in sys.argv[2:]:
    buf = clf.preprocessor.new_buffer()
    clf.preprocessor(decode_image(Path(name)), buf)
    print(Path(name).name, hashlib.sha256(buf.tobytes()).hexdigest())
"""


def _photos(dest: Path) -> list[str]:
    """The bundled samples and every 125th shared ImageNet photo, copied under ``dest``."""
    dest.mkdir(parents=True)
    chosen = sorted((REPO / "agent" / "samples").glob("*.jpg"))
    shared = SHARED / "imagenet-samples"
    if shared.is_dir():
        chosen += sorted(shared.glob("*.JPEG"))[::125]
    for photo in chosen:
        shutil.copyfile(photo, dest / photo.name)
    return sorted(p.name for p in dest.iterdir())


def _source_tree(work: Path) -> Path:
    src = work / "src"
    debroot.copy_checkout(REPO, src)
    _photos(src / "photos")
    (src / "digest.py").write_text(DIGEST)
    return src


def _classify_lines(out: str) -> dict[str, dict[str, Any]]:
    answers = {}
    for line in out.splitlines():
        record = json.loads(line)
        answers[Path(record["input"]).name] = record["top"][0]
    return answers


def _reference(src: Path) -> dict[str, Any]:
    """This machine's answers: top-1 per photo for both models, and the input digests."""
    photos = sorted(str(p) for p in (src / "photos").iterdir())
    reference: dict[str, Any] = {}
    for key, model in (("int8", None), ("float", FLOAT_MODEL)):
        args = ["classify", "--top-k", "1", *(["--model", str(model)] if model else []), *photos]
        out = subprocess.run(
            cli_command(*args), capture_output=True, text=True, check=True, timeout=300
        ).stdout
        reference[key] = _classify_lines(out)
    from edgefleet.factory import factory_model_path

    reference["digests"] = _digests_here(factory_model_path(), photos)
    return reference


def _digests_here(model: Path, photos: list[str]) -> dict[str, str]:
    from edgefleet.inference.classifier import inspect_model
    from edgefleet.inference.images import decode_image

    clf = inspect_model(model)
    out = {}
    for name in photos:
        buf = clf.preprocessor.new_buffer()
        clf.preprocessor(decode_image(Path(name)), buf)
        out[Path(name).name] = hashlib.sha256(buf.tobytes()).hexdigest()
    return out


def _compare(arch: str, reference: dict[str, Any], run: Any, python: str, cli: str) -> str:
    """Classify and digest inside the root; a readable account of any difference."""
    digests = dict(
        line.split()
        for line in run(
            f"cd /src && {python} digest.py "
            f"$({python} -c 'import edgefleet.factory as f; print(f.factory_model_path())') "
            "photos/*"
        ).splitlines()
    )
    report = []
    tensor_diff = sorted(n for n, d in reference["digests"].items() if digests.get(n) != d)
    if tensor_diff:
        report.append(f"input tensors differ from x86 for {tensor_diff}")
    models = (("int8", ""), ("float", "--model /src/models/efficientnet-lite0-fp32.tflite"))
    for key, model in models:
        answers = _classify_lines(run(f"cd /src && {cli} classify --top-k 1 {model} photos/*"))
        for name, want in reference[key].items():
            got = answers.get(name)
            if got is None or got["label"] != want["label"]:
                why = (
                    "its input tensor differs"
                    if name in tensor_diff
                    else "same input tensor: the runtime computes differently"
                )
                report.append(f"{arch} {key} top-1 of {name}: {got} where x86 gave {want} ({why})")
    return "\n".join(report)


# -- arm64: booted, the service, a rollout ------------------------------------------------
ARM64_REASON = nspawn.unavailable(debroot.PI_ARM64)

# What qemu-user cannot give a service, each found failing here, all else as shipped:
# credentials (systemd's ramfs for them: "Failed to set up credentials: Invalid argument",
# status 243), an IPC namespace (PrivateIPC: "Failed to set up IPC namespacing", status 226),
# and the Pi's cpuinfo, which the unit's own /proc (ProtectProc=invisible) would hide: a bind
# of it into the service's namespace. A real Pi runs the unit as shipped (the x86 boot test
# runs it under the same systemd).
QEMU_DROPIN = """\
[Service]
LoadCredential=
PrivateIPC=no
BindReadOnlyPaths=/etc/cpuinfo-pi:/proc/cpuinfo
"""


@pytest.mark.skipif(ARM64_REASON is not None, reason=ARM64_REASON or "")
def test_arm64_pi_install_service_reports_rollout_and_answers(tmp_path: Path) -> None:
    src = _source_tree(tmp_path)
    reference = _reference(src)
    broker = Broker(tmp_path).start()
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/pi-arm64/#"]).start()
    private, public = _keys(tmp_path)
    pip_cache = Path.home() / ".cache" / "pip"
    pip_cache.mkdir(parents=True, exist_ok=True)
    binds = [f"{src}:/src", f"{pip_cache}:/root/.cache/pip"]
    try:
        with nspawn.booted(tmp_path, binds, debroot.PI_ARM64) as m:
            assert m.run("uname -m").stdout.strip() == "aarch64"
            assert "Raspberry Pi 4" in m.run("cat /proc/cpuinfo").stdout
            m.run("install -d -m 0750 /etc/edgefleet /etc/systemd/system/edgefleet.service.d")
            config = _agent_yaml("pi-arm64", broker.port, public)
            m.run(f"cat > /etc/edgefleet/agent.yaml <<'EOF'\n{config}EOF")
            dropin = "/etc/systemd/system/edgefleet.service.d/50-qemu.conf"
            m.run(f"cat > {dropin} <<'EOF'\n{QEMU_DROPIN}EOF")
            out = m.run("cd /src && ./systemd/install.sh", timeout=1800).stdout
            assert "install.sh: arm64, numerics from PyPI" in out
            state = _wait(m, "systemctl is-active edgefleet", "active", 600)
            assert state == "active", m.run("journalctl -u edgefleet -n 50 --no-pager").stdout
            wait_for(lambda: _online(sub), 120, "the Pi's retained status online")
            wait_for(lambda: sub.on("/predictions"), 120, "predictions from the Pi")

            venv = "/opt/edgefleet/venv/bin/python"
            seen = m.run(
                f"{venv} -c 'import apt_pkg, numpy; print(apt_pkg.__file__); print(numpy.__file__)'"
            ).stdout.split()
            assert seen[0].startswith("/usr/lib/python3/dist-packages/")  # Debian's own
            assert seen[1].startswith("/opt/edgefleet/venv")  # the venv's numpy wins

            report = _compare(
                "arm64",
                reference,
                lambda c: m.run(c, timeout=900).stdout,
                venv,
                "/opt/edgefleet/venv/bin/edgefleet",
            )
            assert not report, report

            rollout = subprocess.run(
                cli_command(
                    "rollout", "publish", str(FLOAT_MODEL), "--name", "lite0-float",
                    "--version", "1", "--target", "device:pi-arm64", "--key", str(private),
                    "--broker", broker.url, "--wait-timeout", "900",
                ),
                capture_output=True, text=True, timeout=1000, check=False,
            )  # fmt: skip
            assert rollout.returncode == 0, rollout.stdout + rollout.stderr
            wait_for(lambda: _serving(sub) == ("lite0-float", 1), 120, "the float model serving")
    finally:
        sub.stop()
        broker.stop()


# -- armhf: 32-bit Pi OS in a chroot --------------------------------------------------------
ARMHF_REASON = debroot.unavailable(debroot.PI_ARMHF)


@pytest.mark.skipif(ARMHF_REASON is not None, reason=ARMHF_REASON or "")
def test_armhf_pi_install_with_debian_numerics_runs_and_answers(tmp_path: Path) -> None:
    src = _source_tree(tmp_path)
    reference = _reference(src)
    broker = Broker(tmp_path).start()
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/pi-armhf/#"]).start()
    _, public = _keys(tmp_path)
    pip_cache = Path.home() / ".cache" / "pip"
    pip_cache.mkdir(parents=True, exist_ok=True)
    root = debroot.cached_root(debroot.PI_ARMHF)
    try:
        with debroot.chrooted(
            root, debroot.PI_ARMHF, tmp_path, {src: "/src", pip_cache: "/root/.cache/pip"}
        ) as pi:
            assert pi.run("uname -m").strip() == "armv7l"
            out = pi.run("cd /src && ./systemd/install.sh", timeout=1800)
            assert "install.sh: armhf, numerics from system, not booted" in out
            assert "installed and enabled; it starts on the next boot" in out
            venv = "/opt/edgefleet/venv/bin/python"
            runtime = pi.run(
                f"{venv} -c 'import numpy, cv2, tflite_runtime as t; "
                "print(numpy.__version__, numpy.__file__, cv2.__file__, t.__version__)'"
            ).split()
            assert runtime[0].startswith("1.")  # Debian's numpy, under 2 for tflite-runtime
            assert runtime[1].startswith("/usr/lib/python3/dist-packages/")
            assert runtime[2].startswith("/usr/lib/python3/dist-packages/")
            assert runtime[3].startswith("2.14")
            report = _compare(
                "armhf", reference, lambda c: pi.run(c, timeout=900), venv,
                "/opt/edgefleet/venv/bin/edgefleet",
            )  # fmt: skip
            assert not report, report
            config = _agent_yaml("pi-armhf", broker.port, public, state="/tmp/state")
            pi.run(f"cat > /tmp/agent.yaml <<'EOF'\n{config}EOF")
            pi.run("/opt/edgefleet/venv/bin/edgefleet run -c /tmp/agent.yaml --duration 45", 600)
            assert _online(sub) or sub.on("/status")
            assert sub.on("/predictions"), "no predictions reached the host's broker"
    finally:
        sub.stop()
        broker.stop()


# -- helpers -------------------------------------------------------------------------------
def _keys(work: Path) -> tuple[Path, str]:
    from edgefleet.rollout.release import generate_keys

    private, public = generate_keys(work / "keys", "release")
    return private, public.read_text().replace("\n", "\\n")


def _agent_yaml(device: str, port: int, public_pem: str, state: str = "/var/lib/edgefleet") -> str:
    return (
        f"device: {{id: {device}}}\n"
        "source: {type: images, path: /src/agent/samples, loop: true, fps: 1}\n"
        "delegate: {type: cpu, threads: 2}\n"
        "sinks: []\n"
        f"state_dir: {state}\n"
        "logging: {format: json}\n"
        "fleet:\n"
        f"  url: mqtt://127.0.0.1:{port}\n"
        "  metrics_interval_s: 5\n"
        f'rollout: {{trusted_keys: {{release: "{public_pem}"}}, health_frames: 3, '
        "health_timeout_s: 300}\n"
    )


def _wait(machine: nspawn.Machine, command: str, want: str, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    got = ""
    while time.monotonic() < deadline:
        got = machine.run(command, check=False).stdout.strip()
        if got == want:
            return got
        time.sleep(1)
    return got


def _online(sub: Subscriber) -> bool:
    statuses = [m.json() for m in sub.on("/status") if m.payload]
    return bool(statuses) and statuses[-1].get("state") == "online"


def _serving(sub: Subscriber) -> tuple[str, int] | None:
    statuses = [m.json() for m in sub.on("/status") if m.payload]
    online = [s for s in statuses if s.get("state") == "online" and s.get("model")]
    if not online:
        return None
    model = online[-1]["model"]
    return model["name"], model["version"]
