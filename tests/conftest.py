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

import numpy as np
import pandas as pd
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


# ------------------------------------------------------------------------------ checks every backbone passes
def assert_staged_equals_forward_with_samples_dropped(model, x: torch.Tensor) -> None:
    """Stage by stage, dropping a different share of the samples after every exit, each exit's logits of the
    samples still running equal ``forward``'s: what an early-exit runtime relies on."""
    from models import select_state

    with torch.no_grad():
        full = model(x)
        state, alive = model.init_state(x), torch.arange(len(x))
        for k in range(model.num_exits):
            state, logits = model.run_stage(k, state)
            torch.testing.assert_close(logits, full[k][alive])
            keep = torch.arange(len(alive)) % (k + 2) != 1
            state, alive = select_state(state, keep), alive[keep]
    assert len(alive) < len(x)


def sgd_step_lowers_the_summed_exit_loss(model, x: torch.Tensor, y: torch.Tensor, lr: float = 0.1,
                                         clip: float | None = None, every_parameter: bool = False) -> None:
    """One SGD step on the sum of the exits' CE: finite gradients on every parameter (non-zero ones with
    ``every_parameter``: each layer and head is on a path to the loss), then a lower loss."""
    import torch.nn.functional as F

    def loss() -> torch.Tensor:
        return sum(F.cross_entropy(z, y) for z in model(x))

    before = loss()
    before.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert not every_parameter or p.grad.abs().sum() > 0, name
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    torch.optim.SGD(model.parameters(), lr=lr).step()
    with torch.no_grad():
        assert loss() < before.detach()


# ------------------------------------------------------------------------------ experiment runs
def run_fast(experiment, root: Path, **updates):
    """One run of ``experiment``'s ``fast`` config on one thread: observed into ``root/runs``, snapshots under
    ``root/snapshots`` (``train`` updates merge with that); the observers and threads are put back after."""
    from experiments.tracking import RunFolderObserver

    saved, threads = experiment.ex.observers, torch.get_num_threads()
    experiment.ex.observers = [RunFolderObserver(str(root / "runs"))]
    torch.set_num_threads(1)
    try:
        train = {"snapshot_root": str(root / "snapshots"), **updates.pop("train", {})}
        return experiment.ex.run(named_configs=["fast"], config_updates={"train": train, **updates},
                                 options={"--loglevel": "ERROR"})
    finally:
        experiment.ex.observers = saved
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ text data (AG News, SST-2)
WORDS = "the a news sport world business tech film good bad movie ( ) , . it 's plot fun dull".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
AG_TRAIN, AG_TEST, SST_TRAIN = 60, 12, 24


def sentence(rng: np.random.Generator, n_words: int) -> str:
    return " ".join(rng.choice(WORDS[:11] + WORDS[-4:], size=n_words))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A tiny WordPiece tokenizer saved as a BertTokenizerFast directory (no download)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    folder = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def text_root(tmp_path_factory):
    """AG News as parquet (train) and csv (test); SST-2 as parquet, GLUE-like unlabelled test + test.tsv."""
    folder = tmp_path_factory.mktemp("text_data")
    rng = np.random.default_rng(0)
    ag = folder / "ag_news"
    ag.mkdir()
    pd.DataFrame({"text": [sentence(rng, 3 + i % 9) for i in range(AG_TRAIN)],
                  "label": np.arange(AG_TRAIN) % 4}).to_parquet(ag / "train.parquet")
    pd.DataFrame({"text": ["NA"] + [sentence(rng, 4) for _ in range(AG_TEST - 1)],
                  "label": np.arange(AG_TEST) % 4}).to_csv(ag / "test.csv", index=False)

    sst = folder / "sst2"
    sst.mkdir()
    pd.DataFrame({"sentence": [sentence(rng, 2 + i % 5) for i in range(SST_TRAIN)],
                  "label": np.arange(SST_TRAIN) % 2}).to_parquet(sst / "train.parquet")
    pd.DataFrame({"sentence": ["good fun .", "dull plot .", "bad film"], "label": [1, 0, 0]}).to_parquet(
        sst / "validation.parquet")
    glue_test = ["it 's a good ( fun ) movie . ", "the plot ( world ) is dull", "tech news , good"]
    pd.DataFrame({"sentence": glue_test, "label": [-1, -1, -1]}).to_parquet(sst / "test.parquet")
    (sst / "test.tsv").write_text(  # original SST: other order, upper case, -LRB-/-RRB-, an extra sentence
        "sentence\tlabel\nThe plot -LRB- world -RRB- is dull\t0\nextra sentence\t1\n"
        "Tech news , good\t1\nIt 's a good -LRB- fun -RRB- movie .\t1\n", encoding="utf-8")
    return str(folder)
