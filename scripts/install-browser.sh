#!/usr/bin/env bash
# Install Debian's chromium for the report's browser test (tests/tasks/test_ioi_cli.py), when it
# is missing and this user can install packages; otherwise say why that test will skip.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium is not installed and cannot be installed here (needs root and apt-get): the browser test will skip"
    exit 0
fi
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
