#!/usr/bin/env bash
# README command 2: set up and run the quick test suite (every test not marked slow; real
# Mosquitto, InfluxDB and headless Chromium started by the fixtures). <= 6 min on a 2-core machine.
#   deploy/scripts/test.sh            the quick suite: pytest -m "not slow"
#   deploy/scripts/test.sh --slow     the slow suite: end-to-end on real recordings, eval, drills, browser
#   deploy/scripts/test.sh --all      both
# Further arguments go to pytest (e.g. -x, -k NAME, tests/test_cli.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
marker="not slow"
case "${1:-}" in
  --slow) marker="slow"; shift ;;
  --all) marker=""; shift ;;
esac
deploy/scripts/install-system-deps.sh
deploy/scripts/setup.sh test
if [ -n "$marker" ]; then
  exec .venv/bin/python -m pytest -m "$marker" "$@"
fi
exec .venv/bin/python -m pytest "$@"
