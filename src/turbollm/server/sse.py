"""Server-sent events: JSON `data:` lines, and a response that runs cleanup however it ends."""
from __future__ import annotations

import json
from collections.abc import Callable

from starlette.responses import StreamingResponse

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def dumps(obj) -> str:
    """Compact JSON (non-ASCII kept as UTF-8)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_event(obj) -> bytes:
    """One `data: <json>` event."""
    return b"data: " + dumps(obj).encode("utf-8") + b"\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response whose `on_close` runs when it ends for any reason.

    Starlette cancels the body iterator when the client disconnects; the iterator may then be
    suspended at a `yield` and never resumed, so cleanup in its own `finally` would wait for
    garbage collection. `on_close` (aborting the engine requests) runs right away instead.
    """

    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, headers=SSE_HEADERS)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except BaseException:  # noqa: BLE001 - already closing
                    pass
