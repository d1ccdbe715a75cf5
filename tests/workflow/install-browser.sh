#!/usr/bin/env bash
# Debian's Chromium, which tests/workflow/test_report_browser.py drives through Playwright (no
# browser download: this machine reaches only the package registries). Idempotent; needs root.
set -euo pipefail
if command -v chromium > /dev/null; then
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null
chromium --version
