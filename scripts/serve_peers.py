"""`turbollm serve` against llama-cpp-python's OpenAI server on the same GGUF, both measured by
the third-party load generator llama-benchy (installed in its own venv by `make bench-serve-peers`).

    python scripts/serve_peers.py --client .venv-loadgen/bin/llama-benchy \
        [--concurrency 1 4 16 64] [--prompt-tokens 512] [--max-tokens 128] [-- SERVE FLAGS]

Flags after `--` go to `turbollm serve`. The peer runs when `python -c "import llama_cpp"`
works for --peer-python (default: this interpreter; `make peers` installs it) and is skipped with
one line otherwise. Prints one markdown table (decode tok/s and TTFT per concurrency) and the
machine; llama-benchy's raw reports and both servers' logs stay in --out.
"""
from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from turbollm.bench.benchy_report import (answer_warnings, format_table, machine_line,
                                          parse_progress, parse_report)
from turbollm.config import default_num_threads

REPO = Path(__file__).resolve().parent.parent
PEER_LABEL = "llama-cpp-python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started with its output in a log file, ready when `ready_path` answers 200."""

    def __init__(self, name: str, cmd: list[str], port: int, ready_path: str, log: Path):
        self.name, self.ready_path, self.log = name, ready_path, log
        self.url = f"http://127.0.0.1:{port}"
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def served_model(self) -> str:
        """The model id the server answers to (clients must send it back)."""
        with urllib.request.urlopen(self.url + "/v1/models", timeout=10) as r:
            return json.load(r)["data"][0]["id"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def serve_corpus(text: str) -> tuple[http.server.HTTPServer, str]:
    """llama-benchy draws its prompts from a text it downloads (a Gutenberg book by default);
    serving our offline corpus locally keeps the run off the network and the same every time."""
    body = text.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep the console for the table
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/corpus.txt"


def run_client(args, server: ServerProcess, name: str, corpus_url: str, tokenizer: Path,
               out: Path) -> tuple[dict, dict]:
    """llama-benchy against one ready server: (results, answer checks) per concurrency."""
    report, progress = out / f"{name}.json", out / f"{name}.progress.jsonl"
    cmd = [args.client, "--base-url", server.url + "/v1", "--model", server.served_model(),
           "--tokenizer", str(tokenizer), "--book-url", corpus_url,
           "--pp", str(args.prompt_tokens), "--tg", str(args.max_tokens),
           "--concurrency", *map(str, args.concurrency), "--runs", str(args.runs),
           # exact answer lengths (min_tokens + ignore_eos) and unique prompts (no prefix-cache
           # hits), so both servers do the same work; the coherence probe needs a model that
           # reliably answers "Paris", which a 135M model does not, and measures nothing
           "--exact-tg", "--no-cache", "--skip-coherence",
           "--format", "json", "--save-result", str(report), "--emit-progress", str(progress)]
    # HOME: llama-benchy caches the corpus under ~/.cache; keep that inside this run's folder
    env = {**os.environ, "HOME": str(out / "client-home"), "HF_HUB_OFFLINE": "1"}
    with open(out / f"{name}.client.log", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0 or not report.exists():
        text = (out / f"{name}.client.log").read_text(errors="replace").splitlines()[-20:]
        raise RuntimeError(f"llama-benchy failed against {name} ({done.returncode}):\n"
                           + "\n".join(text))
    return parse_report(report.read_text()), parse_progress(progress.read_text())


def peer_problem(python: str) -> str | None:
    """None when llama-cpp-python's server can start under `python`, else one line why not."""
    probe = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{PEER_LABEL} is not installed for {python} (`make peers` builds it)"
    probe = subprocess.run([python, "-c", "import llama_cpp.server.app"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        missing = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "?"
        return (f"{PEER_LABEL}'s server cannot start ({missing}): install its [server] extra "
                f"(`make peers`, or `pip install 'sse-starlette>=1.6.1' "
                f"'starlette-context>=0.3.6,<0.4' 'pydantic-settings>=2.0.1' 'PyYAML>=5.1'`)")
    return None


def peer_version(python: str) -> str:
    return subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                          capture_output=True, text=True).stdout.strip()


def client_version(client: str) -> str:
    """e.g. "llama-benchy 0.4.0" (its --version line)."""
    return subprocess.run([client, "--version"], capture_output=True, text=True).stdout.strip()


def measure(name: str, cmd: list[str], port: int, ready_path: str, args, corpus_url: str,
            tokenizer: Path, out: Path):
    server = ServerProcess(name, cmd, port, ready_path, out / f"{name}.server.log")
    try:
        server.wait_ready()
        print(f"{name}: ready at {server.url}; running llama-benchy", file=sys.stderr)
        return run_client(args, server, name, corpus_url, tokenizer, out)
    finally:
        server.stop()


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:]
    serve_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description="turbollm serve vs llama-cpp-python's server on the "
                                 "same GGUF, both measured by llama-benchy; flags after -- go to "
                                 "turbollm serve")
    ap.add_argument("--client", default=str(REPO / ".venv-loadgen/bin/llama-benchy"),
                    help="the llama-benchy executable")
    ap.add_argument("--model", default="smollm2-135m", help="a bundled name or a .gguf file")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3, help="measured runs per concurrency")
    ap.add_argument("--threads", type=int, default=default_num_threads(),
                    help="CPU threads of both servers")
    ap.add_argument("--peer-python", default=sys.executable,
                    help="interpreter with llama-cpp-python and its server extra")
    ap.add_argument("--no-peer", action="store_true", help="measure turbollm only")
    ap.add_argument("--out", type=Path, default=None,
                    help="raw reports and logs (default bench_out/serve_peers/<UTC time>)")
    return ap.parse_args(argv), serve_flags


def main() -> None:
    args, serve_flags = parse_args()
    from turbollm.corpus import builtin_corpus_text
    from turbollm.loader.resolve import resolve_model
    from turbollm.loader.tokenizer import load_tokenizer

    if not Path(args.client).exists():
        sys.exit(f"no llama-benchy at {args.client}: `make bench-serve-peers` installs it "
                 f"into .venv-loadgen")
    resolved = resolve_model(args.model)
    if resolved.kind != "gguf":
        sys.exit(f"--model must be a GGUF (the peer reads only GGUF), got {resolved.kind}")
    gguf = resolved.path
    out = args.out or REPO / "bench_out" / "serve_peers" / datetime.now(
        timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    # both servers and the client count the same tokens: the GGUF's own vocabulary
    tokenizer = out / "tokenizer.json"
    load_tokenizer(gguf).backend_tokenizer.save(str(tokenizer))
    corpus_server, corpus_url = serve_corpus(builtin_corpus_text())

    port = free_port()
    ours, our_checks = measure(
        "turbollm", [sys.executable, "-m", "turbollm.cli", "serve", "--model", str(args.model),
                     "--num-threads", str(args.threads), "--host", "127.0.0.1",
                     "--port", str(port), *serve_flags],
        port, "/ready", args, corpus_url, tokenizer, out)

    peer = peer_checks = None
    problem = "skipped (--no-peer)" if args.no_peer else peer_problem(args.peer_python)
    if problem:
        print(f"peer: {problem}", file=sys.stderr)
    else:
        port = free_port()
        n_ctx = max(2048, args.prompt_tokens + args.max_tokens + 256)
        peer, peer_checks = measure(
            "llama-cpp-python", [args.peer_python, "-m", "llama_cpp.server", "--model", str(gguf),
                                 "--model_alias", resolved.name, "--n_threads", str(args.threads),
                                 "--n_threads_batch", str(args.threads), "--n_ctx", str(n_ctx),
                                 # its default aborts a streaming answer when the next request
                                 # arrives; we want every concurrent request answered
                                 "--interrupt_requests", "false",
                                 "--host", "127.0.0.1", "--port", str(port)],
            port, "/v1/models", args, corpus_url, tokenizer, out)
    corpus_server.shutdown()

    lines = [format_table(args.concurrency, ours, peer, PEER_LABEL), ""]
    lines += answer_warnings("turbollm", our_checks, args.max_tokens)
    if peer_checks is not None:
        lines += answer_warnings(PEER_LABEL, peer_checks, args.max_tokens)
        lines.append(f"peer: llama-cpp-python {peer_version(args.peer_python)}'s OpenAI server "
                     f"(`python -m llama_cpp.server`, one request at a time), not llama.cpp's "
                     f"C++ llama-server")
    else:
        lines.append(f"peer: not run: {problem}")
    lines.append(f"load: {client_version(args.client)}, streamed chat completions, "
                 f"{args.prompt_tokens}-token prompts, {args.max_tokens}-token answers, "
                 f"{args.runs} run(s) per concurrency (means); TTFT = request sent -> first "
                 f"content token, at the client"
                 + (f"; turbollm serve {' '.join(serve_flags)}" if serve_flags else ""))
    cpuinfo = Path("/proc/cpuinfo")
    lines.append(machine_line(cpuinfo.read_text() if cpuinfo.exists() else "", args.threads,
                              str(gguf)))
    lines.append(f"raw: {out}")
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
