#!/usr/bin/env bash
# Installs Debian's Chromium for the browser test when it is missing (needs root and apt-get).
# Playwright itself comes from PyPI with the test extras; it never downloads a browser here.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  echo "install_browser.sh: Chromium is missing and cannot be installed here (needs root + apt-get);" \
       "install the 'chromium' package to run tests/test_browser.py." >&2
fi
