# Sourced by scripts/test.sh and scripts/demo.sh (which define `log`): apt-get installs that
# start no services, and the Python to pip-install into.

SUDO=()
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
fi

# Debian puts daemons in /usr/sbin, which a non-root PATH often lacks.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }

# Whether apt-get may be used here (false: STREAMLSTM_NO_APT=1, no apt, or no root/sudo).
apt_usable() {
  [ "${STREAMLSTM_NO_APT:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1 &&
    { [ "$(id -u)" -eq 0 ] || [ ${#SUDO[@]} -gt 0 ]; }
}

restore_policy() {
  if [ -n "$POLICY_BACKUP" ]; then
    "${SUDO[@]}" cp -p "$POLICY_BACKUP" "$POLICY"
    rm -f "$POLICY_BACKUP"
  else
    "${SUDO[@]}" rm -f "$POLICY"
  fi
}

# apt-get install PACKAGES without starting their services; returns apt's status.
apt_install_quiet() {
  # Package scripts (mosquitto, prometheus) try to start their services. In a container
  # (no systemd as PID 1), on CI or for the demo (which runs its own broker on :1883) we
  # want none: policy-rc.d exiting 101 tells invoke-rc.d / deb-systemd-invoke "do not start".
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
  local status=0
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" || status=$?
  restore_policy
  trap - EXIT
  return $status
}

# PY := the interpreter to pip-install into: $PYTHON (default python3), or ./.venv when that
# interpreter is Debian's own (PEP 668 makes it refuse `pip install`).
pick_python() {
  PY=${PYTHON:-python3}
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { log "Python >= 3.11 required ($PY)"; exit 1; }
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
