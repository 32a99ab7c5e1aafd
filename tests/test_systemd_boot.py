"""The documented install under a real systemd (PID 1 in a booted Debian 12 container).

Follows docs/deploy.md as a new user would: a config with a `!credential` password, then
`./systemd/install.sh` from a copy of this checkout, then the same again as an upgrade.
Skipped, with the reason, where the container cannot be had (not root, no systemd-nspawn or
debootstrap). Cgroups here are v1, so `DeviceAllow=` cannot be checked: it is not.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from . import debroot, nspawn
from .conftest import REPO

REASON = nspawn.unavailable()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
]
CONFIG = """\
device: {id: boot-test}
source: {type: synthetic, fps: 5, width: 64, height: 48}
model: {top_k: 5}
sinks: []
fleet:
  url: mqtt://127.0.0.1:9
  username: boot-test
  password: !credential mqtt-password
state_dir: /var/lib/edgefleet
logging: {format: json}
"""


def _show(machine: nspawn.Machine, prop: str) -> str:
    return machine.run(f"systemctl show -p {prop} --value edgefleet").stdout.strip()


def _wait(machine: nspawn.Machine, command: str, want: str, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    got = ""
    while time.monotonic() < deadline:
        got = machine.run(command, check=False).stdout.strip()
        if got == want:
            return got
        time.sleep(0.5)
    return got


def test_install_reload_watchdog_upgrade_stop_under_systemd(tmp_path: Path) -> None:
    src = tmp_path / "src"
    debroot.copy_checkout(REPO, src)
    pip_cache = Path.home() / ".cache" / "pip"
    pip_cache.mkdir(parents=True, exist_ok=True)
    binds = [f"{src}:/src", f"{pip_cache}:/root/.cache/pip"]
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():  # this machine's trust store: its network may intercept TLS
        binds.append(f"{bundle}:{bundle}")
    with nspawn.booted(tmp_path, binds) as m:
        m.run("install -d -m 0750 /etc/edgefleet/credentials")
        m.run("printf secret > /etc/edgefleet/credentials/mqtt-password")
        m.run(f"cat > /etc/edgefleet/agent.yaml <<'EOF'\n{CONFIG}EOF")
        assert m.run("getent group apex", check=False).returncode != 0  # as on most machines

        m.run("cd /src && ./systemd/install.sh", timeout=1200)
        groups = m.run("cat /etc/systemd/system/edgefleet.service.d/10-groups.conf").stdout
        assert "SupplementaryGroups=video plugdev" in groups
        assert "apex" not in groups
        # Type=notify: active only once READY=1 came, i.e. after the first inference.
        assert _wait(m, "systemctl is-active edgefleet", "active", 60) == "active"
        first_pid = _show(m, "MainPID")
        assert "agent running" in m.run("journalctl -u edgefleet -o cat").stdout

        # Reload: returns once applied; a broken file is refused, logged at priority err.
        m.run("sed -i 's/top_k: 5/top_k: 2/' /etc/edgefleet/agent.yaml")
        reload_started = time.monotonic()
        m.run("systemctl reload edgefleet", timeout=60)
        reload_s = time.monotonic() - reload_started
        assert '"changed": {"top_k": 2}' in m.run("cat /var/lib/edgefleet/reload.json").stdout
        m.run("echo 'bogus: 1' >> /etc/edgefleet/agent.yaml")
        assert m.run("systemctl reload edgefleet", check=False, timeout=60).returncode != 0
        errors = m.run("journalctl -u edgefleet -p err -o cat").stdout
        assert "reload refused" in errors
        assert _show(m, "ActiveState") == "active"
        m.run("sed -i '/^bogus/d' /etc/edgefleet/agent.yaml")

        # The documented upgrade: the same script again, with the !credential config.
        m.run("cd /src && ./systemd/install.sh", timeout=1200)
        assert _wait(m, "systemctl is-active edgefleet", "active", 60) == "active"
        assert _show(m, "MainPID") != first_pid  # restarted onto the new code
        venvs = m.run("ls -d /opt/edgefleet/venv-*").stdout.split()
        assert len(venvs) == 2  # the new one and the previous

        # The watchdog: a frozen agent stops pinging and is restarted (WatchdogSec 5 here).
        m.run(
            "install -d /run/systemd/system/edgefleet.service.d && printf "
            "'[Service]\\nWatchdogSec=5\\n' > /run/systemd/system/edgefleet.service.d/wd.conf"
            " && systemctl daemon-reload && systemctl restart edgefleet"
        )
        assert _wait(m, "systemctl is-active edgefleet", "active", 60) == "active"
        frozen = _show(m, "MainPID")
        m.run(f"kill -STOP {frozen}")
        assert _wait(m, "systemctl show -p NRestarts --value edgefleet", "1", 60) == "1"
        assert _wait(m, "systemctl is-active edgefleet", "active", 60) == "active"
        assert "watchdog" in m.run("journalctl -u edgefleet -o cat --no-pager").stdout.lower()

        # A clean stop, and the exposure systemd computes for the installed unit.
        started = time.monotonic()
        m.run("systemctl stop edgefleet", timeout=30)
        stop_s = time.monotonic() - started
        assert stop_s < 10
        assert _show(m, "Result") == "success"
        assert _show(m, "ExecMainStatus") == "0"
        security = m.run("systemd-analyze security edgefleet --no-pager", check=False).stdout
        score = re.search(r"Overall exposure level for edgefleet\.service: ([0-9.]+)", security)
        assert score is not None, security[-500:]
        assert float(score.group(1)) <= 2.0
        print(
            f"systemd boot test: reload applied in {reload_s:.2f} s, stop in {stop_s:.2f} s, "
            f"exposure {score.group(1)}"
        )
