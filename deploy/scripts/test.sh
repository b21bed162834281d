#!/usr/bin/env bash
# README command 2: set up and run the test suite (real Mosquitto started by the fixtures).
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/scripts/install-system-deps.sh
deploy/scripts/setup.sh test
exec .venv/bin/python -m pytest "$@"
