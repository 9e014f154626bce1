#!/usr/bin/env bash
# Install the Debian packages named on the command line that are missing.
# As root (CI, containers) with apt-get: installs them. Otherwise: lists what is missing and
# continues; tests that need a missing binary skip with a reason (and fail under CI=true).
set -euo pipefail
missing=()
for pkg in "$@"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "missing Debian packages (install them to run every test): ${missing[*]}" >&2
fi
