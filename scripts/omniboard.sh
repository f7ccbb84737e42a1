#!/usr/bin/env bash
# Start Omniboard (sacred's web dashboard) on the runs a MongoDB holds; installs it once with npm.
#   bash scripts/omniboard.sh                          # MongoDB localhost:27017, database multiexit
#   bash scripts/omniboard.sh 127.0.0.1:27017:multiexit  # HOST:PORT:DB, as given to `-m` / MULTIEXIT_MONGO
#   OMNIBOARD_PORT=9001 bash scripts/omniboard.sh        # serve on another port (default 9000)
# Then open http://localhost:9000/. Needs Node.js and npm (Debian: apt-get install nodejs npm).
# Omniboard lives in $MULTIEXIT_OMNIBOARD_DIR (default ~/.cache/multiexit/omniboard), installed from the
# npm registry on the first call only (version $OMNIBOARD_VERSION, default 2.16.1). Ctrl-C stops it.
set -euo pipefail

MONGO="${1:-${MULTIEXIT_MONGO:-localhost:27017:multiexit}}"
PORT="${OMNIBOARD_PORT:-9000}"   # Omniboard reads its port from $PORT; it moves to the next free one if taken
DIR="${MULTIEXIT_OMNIBOARD_DIR:-$HOME/.cache/multiexit/omniboard}"
VERSION="${OMNIBOARD_VERSION:-2.16.1}"

command -v npm >/dev/null 2>&1 || { echo "omniboard.sh: npm not found (Debian: apt-get install nodejs npm)" >&2; exit 1; }

if [ ! -x "$DIR/node_modules/.bin/omniboard" ]; then
    mkdir -p "$DIR"
    [ -f "$DIR/package.json" ] || echo '{"name": "multiexit-omniboard", "private": true}' > "$DIR/package.json"
    echo "omniboard.sh: installing omniboard@$VERSION into $DIR" >&2
    npm install --prefix "$DIR" --no-audit --no-fund --loglevel=error "omniboard@$VERSION"
fi

echo "omniboard.sh: Omniboard on http://localhost:$PORT/ for MongoDB $MONGO" >&2
cd "$DIR"
PORT="$PORT" exec npx --no-install omniboard -m "$MONGO"
