#!/usr/bin/env bash
# Install what the test-suite needs on Debian: the real servers (nginx,
# redis-server, uWSGI, and HAProxy and Caddy for docs/proxies.md), Node.js for
# the test IdP (panva's oidc-provider, pinned in tests/idp/package-lock.json),
# and a virtualenv at .venv with the package and its test extras. Safe to run
# again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v uwsgi >/dev/null 2>&1 || need+=(uwsgi uwsgi-plugin-python3)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v caddy >/dev/null 2>&1 || need+=(caddy)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need[*]}"
  $SUDO apt-get update -qq
  # policy-rc.d keeps the packages from starting system-wide services: the
  # tests start their own servers on free loopback ports.
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  $SUDO rm -f /usr/sbin/policy-rc.d
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'

npm ci --prefix tests/idp --no-audit --no-fund --loglevel=error
echo "install-deps: ready"
