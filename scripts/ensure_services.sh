#!/usr/bin/env bash
# Installs the Debian packages that tests start by themselves: PostgreSQL and Redis for the native-topology test
# (tests/test_native_stack.py), Chromium for the browser test (tests/test_browser.py, through Playwright). Does
# nothing when all are present; CI starts on a fresh machine, so `make test` calls it. The packages' own system
# services are kept from starting: the test runs its own instances on free loopback ports and stops them afterwards.
set -euo pipefail

missing=()
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
command -v redis-server >/dev/null || missing+=(redis-server)
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

sudo=()
if [[ "$(id -u)" -ne 0 ]]; then
  if ! command -v sudo >/dev/null; then
    echo "ensure_services: ${missing[*]} missing and not root; install them: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  sudo=(sudo)
fi

echo "ensure_services: installing ${missing[*]} (Debian packages, for the native-topology and browser tests)"
# policy-rc.d exit 101 tells the packages' maintainer scripts not to start their services.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e "$policy" ]]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
  "${sudo[@]}" chmod +x "$policy"
  created_policy=1
fi
cleanup() { if [[ $created_policy -eq 1 ]]; then "${sudo[@]}" rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt_install() { "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"; }
# A fresh machine may have no package lists yet: update only when the first try fails.
if ! apt_install; then
  "${sudo[@]}" apt-get update
  apt_install
fi
