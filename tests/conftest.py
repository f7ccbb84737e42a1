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


class TcpProxy:
    """A loopback TCP forwarder to a server: ``stop()`` cuts every connection (a server outage as clients see
    it), ``start()`` serves again on the same port (the server is back, its data intact)."""

    def __init__(self, target_port: int):
        import socket
        import threading

        self._socket, self._threading = socket, threading
        self.target_port = target_port
        self.port = 0
        self._open: list = []
        self._listener = None

    def start(self) -> "TcpProxy":
        sock = self._socket.socket()
        sock.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen()
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._threading.Thread(target=self._accept, args=(sock,), daemon=True).start()
        return self

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # stopped
                return
            upstream = self._socket.create_connection(("127.0.0.1", self.target_port))
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def stop(self) -> None:
        for s in [self._listener, *self._open]:  # shutdown first: it wakes the thread blocked in accept()
            try:
                s.shutdown(self._socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._open.clear()


@pytest.fixture
def mongo_proxy(mongo_url):
    """A ``TcpProxy`` in front of the session's MongoDB, started; stopped after the test."""
    proxy = TcpProxy(int(mongo_url.rstrip("/").rsplit(":", 1)[1])).start()
    yield proxy
    proxy.stop()
