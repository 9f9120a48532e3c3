"""POST /v1/completions: one engine request per prompt, streamed (SSE) or answered whole."""
from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from turbollm.engine.outputs import RequestOutput
from turbollm.server.engine_client import (CLIENT_CLOSED_STATUS, EngineClient, engine_error,
                                           merge_streams, output_error)
from turbollm.server.errors import APIError, error_event
from turbollm.server.logprobs import completion_logprobs
from turbollm.server.params import completion_params
from turbollm.server.protocol import CompletionRequest
from turbollm.server.request_body import read_request_model, usage_of
from turbollm.server.sse import DONE, SSEResponse, sse_event


def prompt_list(p: str | list, max_prompts: int, n: int = 1, param: str = "prompt"
                ) -> list[str | list[int]]:
    """A request's prompts (a string, token ids, or a list of either) as a list of strings /
    token-id lists (400 if any is empty).

    A request may hold at most `max_prompts` sequences in all (prompts x n), so one request
    cannot fill the batch with a thousand sequences.
    """
    if isinstance(p, str):
        prompts: list = [p]
    elif p and isinstance(p[0], int):
        prompts = [p]
    else:
        prompts = list(p)
    if not prompts:
        raise APIError(400, f"{param} must not be empty", param, "invalid_value")
    if len(prompts) > 1 and len(prompts) * n > max_prompts:
        raise APIError(400, f"at most {max_prompts} sequences ({param}s x n) per request, got "
                       f"{len(prompts)} x {n}", param, "invalid_value")
    for x in prompts:
        if len(x) == 0:
            raise APIError(400, f"{param} must not be empty", param, "invalid_value")
    return prompts


async def create_completion(request: Request, client: EngineClient) -> Response:
    """Handle /v1/completions."""
    arrival = time.monotonic()
    req = await read_request_model(request, client.cfg.max_request_bytes_int, CompletionRequest)
    model = client.check_model(req.model)
    lora = client.loras.get(model)  # resolved now: an unload meanwhile does not change it
    prompts = prompt_list(req.prompt, client.cfg.max_prompts, req.n)
    params = completion_params(req, client.cfg)
    client.check_accepting()
    # Tokenize here (off the event loop) so the engine thread only ever sees token ids.
    ids = [p if isinstance(p, list) else await client.encode(p) for p in prompts]
    texts = [p if isinstance(p, str) else None for p in prompts]
    rid = client.new_id("cmpl")
    streams = await client.submit_all(rid, ids, params, arrival, lora)

    def abort_all() -> None:
        for s in streams:
            s.abort()

    ctx = _Ctx(client, rid, model, req, texts, ids)
    if req.stream:
        return SSEResponse(_stream(ctx, streams), on_close=abort_all)
    finals = await client.wait_final(request, streams)
    if finals is None:
        return Response(status_code=CLIENT_CLOSED_STATUS)
    return JSONResponse(ctx.full_response(finals))


class _Ctx:
    """Per-request values the response builders share."""

    def __init__(self, client: EngineClient, rid: str, model: str, req: CompletionRequest,
                 texts: list[str | None], ids: list[list[int]]):
        self.client, self.id, self.model, self.req = client, rid, model, req
        self.created = int(time.time())
        self.texts, self.ids = texts, ids
        self.text_of = client.token_text

    def prompt_text(self, i: int) -> str:
        if self.texts[i] is None:
            self.texts[i] = self.client.decode(self.ids[i])
        return self.texts[i]  # type: ignore[return-value]

    def _envelope(self, choices: list, usage: dict | None) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices}
        # Stream chunks carry "usage": null only when the client asked for a usage chunk.
        if usage is not None or self.include_usage:
            body["usage"] = usage
        return body

    def full_response(self, finals: list[RequestOutput]) -> dict:
        choices = []
        n = self.req.n
        for i, out in enumerate(finals):
            err = output_error(out)
            if err is not None:
                raise err
            prefix = self.prompt_text(i) if self.req.echo else ""
            for c in out.outputs:
                lp = None
                if c.logprobs is not None:
                    lp = completion_logprobs(c.logprobs, self.text_of, len(prefix),
                                             out.prompt_logprobs, self.ids[i])
                choices.append({"index": i * n + c.index, "text": prefix + c.text,
                                "logprobs": lp, "finish_reason": c.finish_reason})
        return self._envelope(choices, usage_of(finals))

    def chunk(self, index: int, text: str, logprobs: dict | None, finish: str | None) -> bytes:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return sse_event(self._envelope([choice], None))

    def echo_chunks(self, i: int, offsets: list[int], logprobs: dict | None):
        """The prompt's text as the first chunk of each of prompt i's n choices."""
        n = self.req.n
        for j in range(n):
            offsets[i * n + j] = len(self.prompt_text(i))
            yield self.chunk(i * n + j, self.prompt_text(i), logprobs, None)

    @property
    def include_usage(self) -> bool:
        return bool(self.req.stream_options and self.req.stream_options.include_usage)


async def _stream(ctx: _Ctx, streams):
    """SSE chunks: one per choice per engine output that changed it, then usage and [DONE]."""
    n = ctx.req.n
    total = len(streams) * n
    done = [False] * total
    sent_lp = [0] * total
    offsets = [0] * total
    finals: list[RequestOutput | None] = [None] * len(streams)
    # Echo: the prompt goes first, at once; with logprobs, when the first output brings the
    # prompt's logprobs.
    echo_first = ctx.req.echo and ctx.req.logprobs is not None
    echoed = [not ctx.req.echo] * len(streams)
    try:
        if ctx.req.echo and not echo_first:
            for i in range(len(streams)):
                for chunk in ctx.echo_chunks(i, offsets, None):
                    yield chunk
                echoed[i] = True
        async for i, out in merge_streams(streams):
            err = output_error(out)
            if err is not None:
                yield error_event(err)
                break
            if not echoed[i]:
                lp = completion_logprobs([], ctx.text_of, 0, out.prompt_logprobs, ctx.ids[i])
                for chunk in ctx.echo_chunks(i, offsets, lp):
                    yield chunk
                echoed[i] = True
            for c in out.outputs:
                idx = i * n + c.index
                if done[idx]:
                    continue
                lp = None
                if c.logprobs is not None and len(c.logprobs) > sent_lp[idx]:
                    lp = completion_logprobs(c.logprobs[sent_lp[idx]:], ctx.text_of,
                                             offsets[idx])
                    sent_lp[idx] = len(c.logprobs)
                offsets[idx] += len(c.delta_text)
                if c.delta_text or c.finish_reason or lp:
                    yield ctx.chunk(idx, c.delta_text, lp, c.finish_reason)
                done[idx] = c.finish_reason is not None
            if out.finished:
                finals[i] = out
        else:
            if ctx.include_usage:
                yield sse_event(ctx._envelope([], usage_of(finals)))  # type: ignore[arg-type]
    except Exception as e:  # the engine died or the server is shutting down
        yield error_event(engine_error(e))
    yield DONE
