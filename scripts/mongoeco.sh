#!/usr/bin/env bash
# Create (once) the side virtual environment that serves a throw-away MongoDB for the analysis tests:
# mongoeco's wire server needs Python >= 3.13, so it lives outside the project's venv.
#   bash scripts/mongoeco.sh            # idempotent; prints the Python that tests/conftest.py uses
# Location: $MULTIEXIT_MONGOECO_VENV (default ~/.cache/multiexit/mongoeco-venv). tests/conftest.py finds
# <venv>/bin/python there by default, or wherever MULTIEXIT_MONGOECO_PYTHON points.
set -euo pipefail

VENV="${MULTIEXIT_MONGOECO_VENV:-$HOME/.cache/multiexit/mongoeco-venv}"
SPEC="mongoeco[wire]==4.11.0"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import mongoeco.wire.proxy, bson" 2>/dev/null; then
    echo "mongoeco venv ready: $VENV/bin/python"
    exit 0
fi

PY=""
for candidate in "${PYTHON313:-}" python3.13 python3.14 "$HOME"/.pyenv/versions/3.13*/bin/python3 \
                 "$HOME"/.pyenv/versions/3.14*/bin/python3 /usr/bin/python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 \
       && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 13))' 2>/dev/null; then
        PY="$(command -v "$candidate")"
        break
    fi
done
if [ -z "$PY" ]; then
    echo "mongoeco.sh: no Python >= 3.13 found (tried \$PYTHON313, python3.13, python3.14, ~/.pyenv/versions/3.1[34]*);" \
         "the MongoDB analysis test will be skipped" >&2
    exit 1
fi

if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
    echo "mongoeco.sh: $VENV exists and is not a virtual environment; not touching it" >&2
    exit 1
fi
[ -f "$VENV/pyvenv.cfg" ] || "$PY" -m venv "$VENV"   # an unfinished venv is reused, not removed
"$VENV/bin/python" -m pip install --quiet "$SPEC"
"$VENV/bin/python" -c "import mongoeco.wire.proxy, bson"
echo "mongoeco venv ready: $VENV/bin/python"
