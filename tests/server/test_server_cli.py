"""`turbollm serve` as a real process: SIGTERM drain, exit codes, the bundled default model."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

TINY_ARGS = ["--dtype", "float32", "--kv-cache-memory", "16MiB", "--num-threads", "1",
             "--max-num-seqs", "8"]


class ServeProcess:
    """`python -m turbollm.cli serve ... --port 0`, its output collected in the background."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "turbollm.cli", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.port: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("server exited:\n" + "".join(self.lines))
            if self.port is not None:
                try:
                    if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        raise AssertionError("server not ready:\n" + "".join(self.lines))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        return "".join(self.lines)


def test_sigterm_drains_then_exits_zero(tiny_llama):
    srv = ServeProcess("--model", str(tiny_llama), "--served-model-name", "tiny",
                       "--shutdown-timeout", "60", *TINY_ARGS)
    try:
        srv.wait_ready()
        result: dict = {}
        first_chunk = threading.Event()

        def stream() -> None:
            text, finish = "", None
            with httpx.stream("POST", srv.url + "/v1/completions", timeout=60, json={
                    "model": "tiny", "prompt": "drain", "max_tokens": 400, "ignore_eos": True,
                    "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        ch = json.loads(line[6:])["choices"][0]
                        text += ch["text"]
                        finish = ch["finish_reason"] or finish
                        first_chunk.set()
                    elif line == "data: [DONE]":
                        result["done"] = True
            result["finish"] = finish

        t = threading.Thread(target=stream)
        t.start()
        assert first_chunk.wait(30)
        srv.proc.send_signal(signal.SIGTERM)
        # Still listening while draining: /ready and new work answer 503.
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/ready", timeout=5).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.post(srv.url + "/v1/completions", timeout=10,
                       json={"model": "tiny", "prompt": "late", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert r.headers["Retry-After"] == "5"  # come back, not "connection refused"
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
        t.join(60)
        assert result == {"done": True, "finish": "length"}  # the in-flight request finished
        assert srv.proc.wait(30) == 0, srv.output()
    finally:
        srv.kill()


def test_unloadable_model_exits_nonzero(tmp_path):
    srv = ServeProcess("--model", str(tmp_path / "no-such-model"), *TINY_ARGS)
    try:
        code = srv.proc.wait(60)
        assert code == 2
        assert "not found" in srv.output()
    finally:
        srv.kill()


def test_a_corrupt_model_file_stops_serve_with_one_line(tmp_path):
    """Checked before the server starts: exit 2, the file and the offset named, no traceback."""
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(b"GGUF\x03\x00\x00\x00")
    srv = ServeProcess("--model", str(cut))
    try:
        assert srv.proc.wait(60) == 2
        out = srv.output()
        assert f"{cut}: truncated" in out and "Traceback" not in out
    finally:
        srv.kill()


@pytest.mark.slow
def test_serve_default_bundled_model_answers_chat():
    srv = ServeProcess()  # no model argument: the bundled SmolLM2-135M
    try:
        srv.wait_ready(180)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        assert model == "smollm2-135m"
        r = client.chat.completions.create(
            model=model, max_tokens=16, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert r.choices[0].message.content.strip()
        assert r.usage.completion_tokens <= 16
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0, srv.output()
    finally:
        srv.kill()
