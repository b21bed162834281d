#!/usr/bin/env bash
# README command 1: set up and run the end-to-end demo on the embedded default
# (in-process MQTT broker, bundled sample recording). No system service, no root.
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/scripts/setup.sh
exec .venv/bin/pdm-edge demo "$@"
