#!/usr/bin/env bash
# The system packages the test suite needs, installed where they are missing: Debian's chromium
# (the browser tests drive it headless) and a PostgreSQL server (the database tests start a
# throwaway cluster). `make test` and `.ci/run` both call this script. It installs with apt-get,
# as root or through sudo when sudo needs no password; where it cannot, it prints one line
# naming what is missing and the command that installs it, and exits 2 before any test runs.
set -euo pipefail
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}  # the browser tests' Chromium (tests/conftest.py)

missing() {
  local need=()
  [ -x "$CHROMIUM" ] || need+=(chromium)
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null \
    || need+=(postgresql)
  echo "${need[@]}"
}

need=$(missing)
[ -z "$need" ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  as_root=(unable)
fi
if command -v apt-get >/dev/null && [ "${as_root[*]-}" != unable ]; then
  echo "installing $need (apt-get, for the browser and PostgreSQL tests)" >&2
  # shellcheck disable=SC2086  # $need is a list of package names
  if "${as_root[@]}" apt-get update -qq >/dev/null \
    && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends $need >/dev/null; then
    need=$(missing)
    [ -z "$need" ] && exit 0
  fi
fi
echo "make test needs $need, missing here: install with 'sudo apt-get install $need'" >&2
exit 2
