#!/usr/bin/env bash
# streamlstm demo: bash scripts/demo.sh [streamlstm demo args...]
#
# Installs the package with the `demo` extra (amqtt, a pure-Python broker), tries to get
# mosquitto from apt when apt is usable (root or passwordless sudo), then runs
# `streamlstm demo`, which uses mosquitto when it finds the binary and amqtt otherwise.
# Env: PYTHON (default python3), STREAMLSTM_NO_APT=1 to never touch apt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[demo.sh] %s\n' "$*" >&2; }

# shellcheck source=scripts/apt.sh
source scripts/apt.sh

try_apt_mosquitto() {
  have mosquitto && return 0
  if ! apt_usable; then
    log "no mosquitto and apt is not usable: the demo will use amqtt"
    return 0
  fi
  log "apt-get install mosquitto"
  apt_install_quiet mosquitto || log "apt-get failed: the demo will use amqtt"
}

try_apt_mosquitto
pick_python
log "pip install -e '.[demo]' with $PY"
"$PY" -m pip install -q --disable-pip-version-check -e '.[demo]'

# The console script of *this* interpreter (pip may put it off PATH, e.g. in .venv/bin).
BIN="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/streamlstm"
[ -x "$BIN" ] || BIN=$(command -v streamlstm)
# mosquitto lives in /usr/sbin, often not on a normal user's PATH.
export PATH="$PATH:/usr/sbin"
log "$BIN demo $*"
exec "$BIN" demo "$@"
