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

# shellcheck source=scripts/apt.sh
source scripts/apt.sh

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
  if ! apt_usable; then
    log "missing ${missing[*]} and apt is not usable (STREAMLSTM_NO_APT, no apt-get, or not root and no"\
        "passwordless sudo): those tests will be skipped"
    return 0
  fi
  log "apt-get install ${missing[*]}"
  apt_install_quiet "${missing[@]}"

  # Fail early and clearly if a package did not give us its tool.
  have mosquitto && have mosquitto_pub && have promtool && have systemd-analyze || {
    log "apt-get finished but a tool is still missing"; exit 1; }
  promtool --version >/dev/null
  systemd-analyze --version >/dev/null
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
