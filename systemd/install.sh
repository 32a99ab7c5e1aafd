#!/usr/bin/env bash
# Install or upgrade the edgefleet agent as a systemd service (run as root on the device):
#   sudo ./systemd/install.sh [--cpu-only]
# Creates the edgefleet user, a venv under /opt/edgefleet, /etc/edgefleet (config and
# credentials), and installs, enables and (re)starts the unit. /var/lib/edgefleet is made by
# systemd (StateDirectory=).
#
# Raspberry Pi OS / Debian: the venv sees the system's packages (picamera2 and libcamera's
# bindings, pycoral, exist only as apt packages), while the project's own requirements are
# installed into the venv and win over the system's copies. By the Debian architecture
# (dpkg, not uname: a 32-bit Pi OS on a 64-bit kernel says aarch64):
#   arm64, amd64: everything from PyPI (ai-edge-litert, numpy, OpenCV wheels);
#   armhf:        OpenCV, numpy, PyYAML and cffi from Debian (apt, when missing; PyPI has no
#                 armv7l wheels for them) and tflite-runtime 2.14 (numpy < 2) as the runtime.
# EDGEFLEET_NUMERICS=system takes the armhf way on any architecture (e.g. to share numpy with
# an apt-installed picamera2); EDGEFLEET_NUMERICS=venv forces the PyPI way.
# Run in a chroot (an image being built), it installs and enables but starts nothing.
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

ARCH=$(dpkg --print-architecture 2>/dev/null || uname -m)
case "${EDGEFLEET_NUMERICS:-}" in
  system|venv) NUMERICS=$EDGEFLEET_NUMERICS ;;
  "") if [ "$ARCH" = armhf ] || [ "$ARCH" = armel ]; then NUMERICS=system; else NUMERICS=venv; fi ;;
  *) echo "install.sh: EDGEFLEET_NUMERICS must be system or venv" >&2; exit 2 ;;
esac
BOOTED=0
[ -d /run/systemd/system ] && BOOTED=1  # systemd runs here (not a chroot, not a build)
echo "install.sh: $ARCH, numerics from ${NUMERICS/venv/PyPI}$([ "$BOOTED" -eq 1 ] || echo ', not booted: nothing started')"

# 1. Build and check, touching nothing the running service uses.
install -d "$PREFIX"
if [ "$NUMERICS" = system ]; then
  missing=""
  for pkg in python3-numpy python3-opencv python3-yaml python3-cffi; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    echo "install.sh: apt-get install$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
  fi
fi
# System site packages: apt-only modules (picamera2, libcamera, pycoral) stay importable.
python3 -m venv --system-site-packages "$NEW_VENV"
"$NEW_VENV/bin/python" -m pip install -q --upgrade pip
if [ "$NUMERICS" = system ]; then
  "$NEW_VENV/bin/python" -m pip install -q --no-deps .
  # shellcheck disable=SC2046 # one requirement per line, none with spaces
  "$NEW_VENV/bin/python" -m pip install -q $(python3 systemd/requirements.py system)
else
  # --ignore-installed: the project's requirements go into the venv even where the system has
  # a copy (Debian's numpy 1.24 beside the OpenCV wheel's numpy 2), so the venv's win.
  "$NEW_VENV/bin/python" -m pip install -q --ignore-installed .
fi
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
# Coral USB: the accelerator is 1a6e:089a until its firmware is loaded, then 18d1:9302; both
# ids must be the plugdev group's (libedgetpu's own package ships the same rule).
if [ "$CPU_ONLY" -eq 0 ]; then
  install -D -m 0644 systemd/71-edgefleet-coral.rules /etc/udev/rules.d/71-edgefleet-coral.rules
  [ "$BOOTED" -eq 1 ] && command -v udevadm >/dev/null && udevadm control --reload || true
fi
# Keep the previous venv (a quick way back), remove older ones.
ls -d "$PREFIX"/venv-* 2>/dev/null | sort | head -n -2 | xargs -r rm -rf
[ "$BOOTED" -eq 1 ] && systemctl daemon-reload
systemctl enable edgefleet.service
if [ "$BOOTED" -eq 0 ]; then
  echo "install.sh: installed and enabled; it starts on the next boot"
  exit 0
fi
# An upgrade must not leave the old code running: restart what runs, start what does not.
systemctl restart edgefleet.service
systemctl --no-pager status edgefleet.service || true
