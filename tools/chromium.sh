#!/usr/bin/env bash
# Headless Chromium for the report's browser test (tests/test_report_browser.py).
#   bash tools/chromium.sh path      print the browser binary; exit 3 when there is none
#   bash tools/chromium.sh install   install Debian's `chromium` with apt-get when missing (needs root), print the binary
# tools/test.sh runs `install` before pytest; the tests skip (or fail with CI=true) without a browser.
set -euo pipefail

find_bin() {
  for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then command -v "$b"; return 0; fi
  done
  return 1
}

case "${1:-path}" in
  path)
    find_bin || { echo "no chromium binary on PATH (bash tools/chromium.sh install)" >&2; exit 3; } ;;
  install)
    find_bin && exit 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
      echo "cannot install chromium here: needs root and apt-get (apt-get install chromium)" >&2; exit 3
    fi
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    find_bin || { echo "apt-get installed chromium but no binary is on PATH" >&2; exit 3; } ;;
  *)
    echo "usage: bash tools/chromium.sh path|install" >&2; exit 2 ;;
esac
