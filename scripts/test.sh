#!/usr/bin/env bash
# Set up (scripts/setup.sh), add the side venv serving a throw-away MongoDB for the tracking tests,
# then run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/mongoeco.sh || echo "test: mongoeco unavailable, the MongoDB test will be skipped"
exec .venv/bin/python -m pytest "$@"
