#!/usr/bin/env bash
# Run the streamlstm test suite: bash scripts/test.sh [pytest args...]
#
# 1. Debian packages the suite drives for real, installed only when missing:
#      mosquitto, mosquitto-clients  -> broker tests (tests/mosquitto.py)
#      prometheus                    -> promtool (rules / rule unit tests)
#      systemd                       -> systemd-analyze (unit verify, exposure gate)
# 2. pip install -e '.[dev]' (into ./.venv when the interpreter is externally managed)
# 3. python -m pytest -p no:cacheprovider -q
#
# `bash scripts/test.sh --deps-only` stops after step 2.
# Env: PYTHON (default python3), STREAMLSTM_NO_APT=1 to never touch apt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[test.sh] %s\n' "$*" >&2; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=(sudo -n); fi
fi

# Debian puts daemons in /usr/sbin, which a non-root PATH often lacks.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

restore_policy() {
  if [ -n "$POLICY_BACKUP" ]; then
    "${SUDO[@]}" cp -p "$POLICY_BACKUP" "$POLICY"
    rm -f "$POLICY_BACKUP"
  else
    "${SUDO[@]}" rm -f "$POLICY"
  fi
}

apt_install_missing() {
  local missing=()
  have mosquitto        || missing+=(mosquitto)
  have mosquitto_pub    || missing+=(mosquitto-clients)
  have promtool         || missing+=(prometheus)
  have systemd-analyze  || missing+=(systemd)
  if [ ${#missing[@]} -eq 0 ]; then
    log "system tools present (mosquitto, mosquitto_pub, promtool, systemd-analyze)"
    return 0
  fi
  if [ "${STREAMLSTM_NO_APT:-0}" = 1 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "missing ${missing[*]} and apt is not available: those tests will be skipped"
    return 0
  fi
  if [ "$(id -u)" -ne 0 ] && [ ${#SUDO[@]} -eq 0 ]; then
    log "missing ${missing[*]}; not root and no passwordless sudo: those tests will be skipped"
    return 0
  fi
  log "apt-get install ${missing[*]}"

  # Package scripts (mosquitto, prometheus) try to start their services. In a container
  # (no systemd as PID 1) or on CI we want no system broker/prometheus at all:
  # policy-rc.d exiting 101 tells invoke-rc.d / deb-systemd-invoke "do not start".
  # (Globals, not locals: the EXIT trap may run after this function has unwound.)
  POLICY=/usr/sbin/policy-rc.d
  POLICY_BACKUP=""
  if [ -e "$POLICY" ]; then
    POLICY_BACKUP=$(mktemp)
    "${SUDO[@]}" cp -p "$POLICY" "$POLICY_BACKUP"
  fi
  trap restore_policy EXIT
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod 755 "$POLICY"

  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"

  restore_policy
  trap - EXIT

  # Fail early and clearly if a package did not give us its tool.
  have mosquitto && have mosquitto_pub && have promtool && have systemd-analyze || {
    log "apt-get finished but a tool is still missing"; exit 1; }
  promtool --version >/dev/null
  systemd-analyze --version >/dev/null
}

pick_python() {
  PY=${PYTHON:-python3}
  "$PY" - <<'PYEOF' || { log "Python >= 3.11 required ($PY)"; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PYEOF
  # Debian's own python3 refuses `pip install` (PEP 668): use a project venv instead.
  local in_venv managed
  in_venv=$("$PY" -c 'import sys; print(int(sys.prefix != sys.base_prefix))')
  managed=$("$PY" -c 'import os, sysconfig; print(int(os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))')
  if [ "$in_venv" = 0 ] && [ "$managed" = 1 ]; then
    if [ ! -x .venv/bin/python ]; then
      log "externally managed $PY: creating .venv"
      "$PY" -m venv .venv || { log "python3-venv missing: apt-get install python3-venv"; exit 1; }
    fi
    PY=.venv/bin/python
  fi
}

apt_install_missing
pick_python
log "pip install -e '.[dev]' with $PY"
"$PY" -m pip install -q --disable-pip-version-check -e '.[dev]'

if [ "${1:-}" = "--deps-only" ]; then
  exit 0
fi

# -p no:cacheprovider: no .pytest_cache in the tree (read-only checkouts, concurrent runs).
exec "$PY" -m pytest -p no:cacheprovider -q "$@"
