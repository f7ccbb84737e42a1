#!/usr/bin/env bash
# A local MongoDB stand-in for trying tracking without mongod: mongoeco's wire server (the side venv of
# scripts/mongoeco.sh), data kept in a SQLite file so runs survive a restart. Loopback only; Ctrl-C stops it.
#   bash scripts/mongo_server.sh                 # 127.0.0.1:27017, data in ~/.cache/multiexit/mongo.sqlite
#   bash scripts/mongo_server.sh 27018 /tmp/m.db # another port and file
# Then: python experiments/imta.py -m 127.0.0.1:27017:multiexit with stage=ge quick
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${1:-27017}"
DB_FILE="${2:-$HOME/.cache/multiexit/mongo.sqlite}"
bash scripts/mongoeco.sh >/dev/null
PY="${MULTIEXIT_MONGOECO_VENV:-$HOME/.cache/multiexit/mongoeco-venv}/bin/python"
mkdir -p "$(dirname "$DB_FILE")"
echo "mongo_server.sh: MongoDB wire protocol on 127.0.0.1:$PORT, data in $DB_FILE (Ctrl-C stops)" >&2
exec "$PY" - "$PORT" "$DB_FILE" <<'PY'
import asyncio, signal, sys
from mongoeco.engines import SQLiteEngine
from mongoeco.wire import AsyncMongoEcoProxyServer

async def serve(port: int, path: str) -> None:
    async with AsyncMongoEcoProxyServer(host="127.0.0.1", port=port, engine=SQLiteEngine(path)):
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()

asyncio.run(serve(int(sys.argv[1]), sys.argv[2]))
PY
