"""Chat templates sent by clients (`--allow-request-chat-template`), rendered in a child process
that is killed when a render runs past its time limit.

The jinja2 sandbox keeps a template away from Python's internals, but not from looping for ever
(`range` is capped at 100,000, and loops nest), and a thread cannot be stopped: rendered on the
server's tokenizer thread, one such template would stall every later request. The child renders
one conversation at a time; past the limit it is killed (a 400 for that request) and a new one
is started for the next. The server's own template is trusted and still rendered in-process.
"""
from __future__ import annotations

import multiprocessing
import threading

RENDER_TIMEOUT_S = 2.0
STARTUP_TIMEOUT_S = 120.0  # spawning the child imports transformers
MAX_PROMPT_CHARS = 4 * 2**20  # a rendered prompt longer than this is refused in the child


class TemplateRenderer:
    """render(messages, template) -> prompt text, raising ValueError (a 400) for a template
    that fails, runs past `timeout_s` or renders more than MAX_PROMPT_CHARS characters."""

    def __init__(self, tokenizer, timeout_s: float = RENDER_TIMEOUT_S):
        self._tokenizer = tokenizer
        self.timeout_s = timeout_s
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a threaded process
        self._proc = None
        self._conn = None
        self._lock = threading.Lock()
        self.kills = 0  # renders stopped at the time limit

    def render(self, messages: list[dict], template: str) -> str:
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self._start()
            self._conn.send((messages, template))
            if not self._conn.poll(self.timeout_s):
                self._stop()
                self.kills += 1
                raise ValueError(f"the chat template did not finish rendering within "
                                 f"{self.timeout_s:g} s")
            try:
                ok, value = self._conn.recv()
            except EOFError:  # the child died (out of memory, say)
                self._stop()
                raise ValueError("rendering the chat template failed") from None
        if not ok:
            raise ValueError(value)
        return value

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child, self._tokenizer),
                                       name="turbollm-template", daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(STARTUP_TIMEOUT_S):  # the child says it is ready
            self._stop()
            raise RuntimeError("the chat template renderer did not start")
        parent.recv()

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(10)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None


def _serve(conn, tokenizer) -> None:
    """The child: render each (messages, template) it is sent, answer (ok, text or error)."""
    from turbollm.chat import render_chat
    conn.send("ready")
    while True:
        try:
            messages, template = conn.recv()
        except EOFError:
            return
        try:
            text = render_chat(tokenizer, messages, template)
            if len(text) > MAX_PROMPT_CHARS:
                raise ValueError(f"the rendered prompt has {len(text)} characters, more than "
                                 f"{MAX_PROMPT_CHARS}")
            conn.send((True, text))
        except Exception as e:  # noqa: BLE001 - every failure is the template's, sent back
            conn.send((False, f"{type(e).__name__}: {e}"[:500]))
