"""A torchrun launch as two "nodes" on 127.0.0.1 (`python -m turbollm.serve`, one rank per
node, TP = 2 or PP = 2 over gloo: LOCAL_WORLD_SIZE = 1, so no shared memory, as across two
hosts): rank 0 serves the OpenAI API with the same greedy text as one process, and a rank
killed while the server is idle makes rank 0 exit with a clear error instead of hanging. The
ranks are started with the environment torchrun gives them (torchrun's own agents add nothing
the ranks see; the two-agent command of docs/distributed.md was run by hand)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch.distributed as dist

from turbollm import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")

PROMPTS = [[5, 17, 29, 41, 53, 65, 77], [100, 200, 300], list(range(11, 51))]
MAX_TOKENS = 8
ENGINE_FLAGS = ["--dtype", "float32", "--kv-cache-memory", "64MiB"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_rank(rank: int, master_port: int, http_port: int, model: str, log_path,
                parallel: list[str]):
    """One rank as torchrun starts it on a node of its own (--nnodes 2 --nproc-per-node 1)."""
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(master_port)}
    cmd = [sys.executable, "-m", "turbollm.serve", "--model", model, *parallel,
           "--cpu-threads-per-worker", "1", "--distributed-timeout-s", "8",
           "--host", "127.0.0.1", "--port", str(http_port), *ENGINE_FLAGS]
    return subprocess.Popen(cmd, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _wait_ready(base: str, procs, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank exited before the server was ready")
        try:
            with urllib.request.urlopen(base + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise AssertionError("server not ready in time")


@pytest.mark.parametrize("parallel", [["-tp", "2"], ["-pp", "2"]], ids=["tp2", "pp2"])
def test_two_node_torchrun_launch_serves_one_process_text_and_fails_on_a_lost_rank(
        tiny_llama, tmp_path, parallel):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="64MiB")
    expected = [o.outputs[0].text for o in llm.generate(PROMPTS, params)]
    del llm

    master_port, http_port = _free_port(), _free_port()
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = [_start_rank(r, master_port, http_port, str(tiny_llama), logs[r], parallel)
             for r in (0, 1)]
    base = f"http://127.0.0.1:{http_port}"
    try:
        _wait_ready(base, procs)
        got = _post(base + "/v1/completions",
                    {"model": str(tiny_llama), "prompt": PROMPTS, "max_tokens": MAX_TOKENS,
                     "temperature": 0, "ignore_eos": True})
        texts = [c["text"] for c in sorted(got["choices"], key=lambda c: c["index"])]
        assert texts == expected
        metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        assert "gloo, torchrun" in metrics  # collectives over gloo, not shared memory

        # rank 1 dies while the server is idle: rank 0's health ping finds it
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(10)
        code = procs[0].wait(30)
        out = logs[0].read_text()
        assert code == 1, out[-3000:]
        assert "tensor/pipeline rank is unreachable" in out or "sent no reply" in out, \
            out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
