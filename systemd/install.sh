#!/usr/bin/env bash
# Install the edgefleet agent as a systemd service (run as root on the device):
#   sudo ./systemd/install.sh [--cpu-only]
# Creates the edgefleet user, a venv under /opt/edgefleet, /etc/edgefleet (config and
# credentials), and installs and enables the unit. /var/lib/edgefleet is made by systemd
# (StateDirectory=). Re-running upgrades the venv in place.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }

PREFIX=/opt/edgefleet
CPU_ONLY=0
[ "${1:-}" = "--cpu-only" ] && CPU_ONLY=1

getent group edgefleet >/dev/null || groupadd --system edgefleet
if ! id edgefleet >/dev/null 2>&1; then
  useradd --system --gid edgefleet --home-dir /var/lib/edgefleet --no-create-home \
    --shell /usr/sbin/nologin edgefleet
fi
# Only the groups the devices need; each is skipped where the system does not have it.
for group in video plugdev apex; do
  getent group "$group" >/dev/null && usermod -aG "$group" edgefleet
done

python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/python" -m pip install -q --upgrade pip
"$PREFIX/venv/bin/python" -m pip install -q .
install -m 0644 README.md "$PREFIX/README.md"

install -d -m 0750 -o root -g edgefleet /etc/edgefleet /etc/edgefleet/credentials
if [ ! -e /etc/edgefleet/agent.yaml ]; then
  install -m 0640 -o root -g edgefleet configs/agent.example.yaml /etc/edgefleet/agent.yaml
  echo "install.sh: edit /etc/edgefleet/agent.yaml (device id, broker, source)"
fi
[ -e /etc/edgefleet/credentials/mqtt-password ] || \
  install -m 0600 /dev/null /etc/edgefleet/credentials/mqtt-password

install -m 0644 systemd/edgefleet.service /etc/systemd/system/edgefleet.service
if [ "$CPU_ONLY" -eq 1 ]; then
  install -d /etc/systemd/system/edgefleet.service.d
  install -m 0644 systemd/edgefleet.service.d/cpu-only.conf.example \
    /etc/systemd/system/edgefleet.service.d/cpu-only.conf
fi
"$PREFIX/venv/bin/edgefleet" check-config /etc/edgefleet/agent.yaml
systemctl daemon-reload
systemctl enable --now edgefleet.service
systemctl --no-pager status edgefleet.service || true
