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

SUDO=()
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
fi

have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }

restore_policy() {
  if [ -n "$POLICY_BACKUP" ]; then
    "${SUDO[@]}" cp -p "$POLICY_BACKUP" "$POLICY"
    rm -f "$POLICY_BACKUP"
  else
    "${SUDO[@]}" rm -f "$POLICY"
  fi
}

try_apt_mosquitto() {
  have_mosquitto && return 0
  if [ "${STREAMLSTM_NO_APT:-0}" = 1 ] || ! command -v apt-get >/dev/null 2>&1 \
     || { [ "$(id -u)" -ne 0 ] && [ ${#SUDO[@]} -eq 0 ]; }; then
    log "no mosquitto and apt is not usable: the demo will use amqtt"
    return 0
  fi
  log "apt-get install mosquitto"
  # Do not let the package start a system-wide broker on :1883 (the demo runs its own):
  # policy-rc.d exiting 101 = "do not start services".
  POLICY=/usr/sbin/policy-rc.d
  POLICY_BACKUP=""
  if [ -e "$POLICY" ]; then POLICY_BACKUP=$(mktemp); "${SUDO[@]}" cp -p "$POLICY" "$POLICY_BACKUP"; fi
  trap restore_policy EXIT
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod 755 "$POLICY"
  if ! { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
         "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mosquitto; }; then
    log "apt-get failed: the demo will use amqtt"
  fi
  restore_policy
  trap - EXIT
}

pick_python() {
  PY=${PYTHON:-python3}
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { log "Python >= 3.11 required ($PY)"; exit 1; }
  # Debian's python3 refuses `pip install` (PEP 668): use the project venv (same as scripts/test.sh).
  if [ "$("$PY" -c 'import sys; print(int(sys.prefix != sys.base_prefix))')" = 0 ] &&
     [ "$("$PY" -c 'import os, sysconfig; print(int(os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))')" = 1 ]; then
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    PY=.venv/bin/python
  fi
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
