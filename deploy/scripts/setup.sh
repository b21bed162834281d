#!/usr/bin/env bash
# Create/refresh the project virtualenv (.venv) with pdm-edge installed in editable mode.
# Usage: deploy/scripts/setup.sh [extra]    e.g. "test" installs the test dependencies too.
# Needs python3 >= 3.11 with venv (Debian: python3-venv). No root.
set -euo pipefail
cd "$(dirname "$0")/../.."
extra="${1:-}"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "pdm-edge needs Python >= 3.11 (found: $("$PY" --version 2>&1))" >&2; exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv || { echo "python3 -m venv failed: on Debian install python3-venv" >&2; exit 1; }
fi
stamp=".venv/.pdm-edge-installed${extra:+-$extra}"
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # The CPU build of PyTorch, pinned: a looser range pulls a multi-GB CUDA build.
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".${extra:+[$extra]}"
    # Flower's own command line (flwr run, used by pdm-edge fleet server) needs typer >= 0.16
    # (typing.Literal options); amqtt 0.11 pins typer 0.15.4 for its command-line scripts only,
    # which pdm-edge does not use (it embeds amqtt's broker), so pip resolves 0.15.4 and flwr's
    # CLI fails. Install the typer flwr 1.42 accepts (< 0.21) over it; pip prints a conflict
    # line about amqtt's pin and exits 0.
    .venv/bin/python -m pip install --quiet "typer>=0.16,<0.21"
    echo "$want" > "$stamp"
fi
