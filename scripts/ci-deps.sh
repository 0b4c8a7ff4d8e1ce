#!/usr/bin/env bash
# System dependency of the test suite (called by scripts/setup.sh --test): Debian's chromium, so the HTML
# report test loads the page in a real headless browser. Python test extras (lm-eval, ray) come from
# pyproject's optional dependencies. A missing browser makes that one test skip with its reason.
set -uo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get install -y -q chromium >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; } \
    || echo "chromium could not be installed: the report browser test will be skipped"
fi
exit 0
