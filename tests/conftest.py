"""A throw-away MongoDB for the analysis tests: mongoeco's wire server, run from its own Python 3.13 venv.

Enable it with ``bash scripts/mongoeco.sh`` (creates ~/.cache/multiexit/mongoeco-venv) or point
MULTIEXIT_MONGOECO_PYTHON at a Python that has ``mongoeco[wire]`` installed. Without either, tests using
the ``mongo_url`` fixture are skipped.
"""
from __future__ import annotations

import os
import select
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

MONGOECO_PYTHON = Path(os.environ.get("MULTIEXIT_MONGOECO_PYTHON",
                                      Path.home() / ".cache/multiexit/mongoeco-venv/bin/python"))

# Serves on a free loopback port, prints it, and stops when its stdin closes (so it never outlives pytest).
_SERVER = """
import asyncio, sys
from mongoeco.wire import AsyncMongoEcoProxyServer
async def main():
    async with AsyncMongoEcoProxyServer(host="127.0.0.1", port=0) as server:
        print(server.address.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main())
"""


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on 2 shared cores, two spinning OpenMP threads make tiny convolutions ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mongo_url():
    """``mongodb://127.0.0.1:PORT/`` of a fresh in-memory mongoeco server for this test session."""
    usable = MONGOECO_PYTHON.exists() and subprocess.run(
        [str(MONGOECO_PYTHON), "-c", "import mongoeco.wire, bson"], capture_output=True).returncode == 0
    if not usable:
        pytest.skip(f"no Python with mongoeco[wire] at {MONGOECO_PYTHON}: run `bash scripts/mongoeco.sh` "
                    "or set MULTIEXIT_MONGOECO_PYTHON to a Python with mongoeco[wire] installed")
    errors = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([str(MONGOECO_PYTHON), "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=errors, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline().strip() if ready else ""
        if not line.isdigit():
            proc.kill()
            proc.wait(timeout=5)
            errors.seek(0)
            err = errors.read()
            pytest.fail(f"mongoeco server did not start ({MONGOECO_PYTHON}): {err[-2000:] or 'no output in 30 s'}")
        url = f"mongodb://127.0.0.1:{line}/"
        import pymongo

        client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.admin.command("ping")
                break
            except pymongo.errors.PyMongoError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client.close()
        yield url
    finally:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        errors.close()
