#!/usr/bin/env bash
# README command 1: set up and run the end-to-end demo on the embedded default (in-process
# MQTT broker, bundled sample recording, SQLite store) and open the dashboard on its data.
# No system service, no root. Pass --no-dashboard to end after the replay's summary.
set -euo pipefail
cd "$(dirname "$0")/../.."
deploy/scripts/setup.sh
args=("$@")
case " $* " in
  *" --no-dashboard "*|*" --dashboard "*) ;;
  *) args=(--dashboard "${args[@]}") ;;
esac
exec .venv/bin/pdm-edge demo "${args[@]}"
