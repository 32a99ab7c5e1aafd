#!/usr/bin/env bash
# Install or upgrade the edgefleet agent as a systemd service (run as root on the device):
#   sudo ./systemd/install.sh [--cpu-only]
# Creates the edgefleet user, a venv under /opt/edgefleet, /etc/edgefleet (config and
# credentials), and installs, enables and (re)starts the unit. /var/lib/edgefleet is made by
# systemd (StateDirectory=).
#
# All or nothing: the new venv is built beside the running one and the config is checked
# with it (and with the credentials the unit loads) before anything the service uses is
# touched; only then are the venv link, the unit and its drop-ins switched, systemd reloaded
# and a running agent restarted onto the new code. A failure before that leaves the old
# installation exactly as it was.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }

PREFIX=/opt/edgefleet
UNIT_DIR=${EDGEFLEET_UNIT_DIR:-/etc/systemd/system}
CPU_ONLY=0
[ "${1:-}" = "--cpu-only" ] && CPU_ONLY=1
STAMP=$(date +%Y%m%d%H%M%S)-$$
NEW_VENV="$PREFIX/venv-$STAMP"
STAGE=$(mktemp -d)
cleanup() { rm -rf "$STAGE"; [ -n "${KEEP_NEW:-}" ] || rm -rf "$NEW_VENV"; }
trap cleanup EXIT

getent group edgefleet >/dev/null || groupadd --system edgefleet
if ! id edgefleet >/dev/null 2>&1; then
  useradd --system --gid edgefleet --home-dir /var/lib/edgefleet --no-create-home \
    --shell /usr/sbin/nologin edgefleet
fi

# 1. Build and check, touching nothing the running service uses.
install -d "$PREFIX"
python3 -m venv "$NEW_VENV"
"$NEW_VENV/bin/python" -m pip install -q --upgrade pip
"$NEW_VENV/bin/python" -m pip install -q .
install -d -m 0750 -o root -g edgefleet /etc/edgefleet /etc/edgefleet/credentials
[ -e /etc/edgefleet/credentials/mqtt-password ] || \
  install -m 0600 /dev/null /etc/edgefleet/credentials/mqtt-password
CONFIG=/etc/edgefleet/agent.yaml
[ -e "$CONFIG" ] || CONFIG=configs/agent.example.yaml
"$NEW_VENV/bin/edgefleet" check-config "$CONFIG" --credentials /etc/edgefleet/credentials

# Only the supplementary groups this system has (a missing one fails every start).
groups=""
for group in video plugdev apex; do
  getent group "$group" >/dev/null && groups="$groups $group"
done
cp systemd/edgefleet.service "$STAGE/edgefleet.service"
if [ "$CPU_ONLY" -eq 0 ] && [ -n "$groups" ]; then
  printf '# Written by install.sh: the groups this system has.\n[Service]\nSupplementaryGroups=%s\n' \
    "${groups# }" > "$STAGE/10-groups.conf"
fi
[ "$CPU_ONLY" -eq 1 ] && cp systemd/edgefleet.service.d/cpu-only.conf.example "$STAGE/cpu-only.conf"

# 2. Switch: each step a rename, then systemd and the service.
KEEP_NEW=1
# Installs before versioned venvs had a plain folder here: keep it as the previous one.
if [ -d "$PREFIX/venv" ] && [ ! -L "$PREFIX/venv" ]; then
  mv "$PREFIX/venv" "$PREFIX/venv-00000000000000-legacy"
fi
ln -sfn "$NEW_VENV" "$PREFIX/venv.new" && mv -T "$PREFIX/venv.new" "$PREFIX/venv"
install -m 0644 README.md "$PREFIX/README.md"
if [ ! -e /etc/edgefleet/agent.yaml ]; then
  install -m 0640 -o root -g edgefleet configs/agent.example.yaml /etc/edgefleet/agent.yaml
  echo "install.sh: edit /etc/edgefleet/agent.yaml (device id, broker, source)"
fi
install -d "$UNIT_DIR/edgefleet.service.d"
for dropin in 10-groups.conf cpu-only.conf; do
  if [ -e "$STAGE/$dropin" ]; then
    install -m 0644 "$STAGE/$dropin" "$UNIT_DIR/edgefleet.service.d/.$dropin.new"
    mv "$UNIT_DIR/edgefleet.service.d/.$dropin.new" "$UNIT_DIR/edgefleet.service.d/$dropin"
  else
    rm -f "$UNIT_DIR/edgefleet.service.d/$dropin"
  fi
done
install -m 0644 "$STAGE/edgefleet.service" "$UNIT_DIR/.edgefleet.service.new"
mv "$UNIT_DIR/.edgefleet.service.new" "$UNIT_DIR/edgefleet.service"
systemctl daemon-reload
systemctl enable edgefleet.service
# An upgrade must not leave the old code running: restart what runs, start what does not.
systemctl restart edgefleet.service
# Keep the previous venv (a quick way back), remove older ones.
ls -d "$PREFIX"/venv-* 2>/dev/null | sort | head -n -2 | xargs -r rm -rf
systemctl --no-pager status edgefleet.service || true
