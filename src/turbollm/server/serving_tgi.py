"""TGI-style POST /generate and /generate_stream (text-generation-inference request format)."""
from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from turbollm.engine.outputs import CompletionOutput, RequestOutput
from turbollm.server.engine_client import (CLIENT_CLOSED_STATUS, EngineClient, engine_error,
                                           output_error)
from turbollm.server.errors import APIError, error_event
from turbollm.server.logprobs import TokenText
from turbollm.server.params import tgi_params
from turbollm.server.protocol import TGIRequest
from turbollm.server.request_body import read_request_model
from turbollm.server.sse import SSEResponse, sse_event


def _finish_reason(c: CompletionOutput) -> str:
    """TGI's names: length, eos_token, stop_sequence."""
    if c.finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(c.stop_reason, str) else "eos_token"


def _token(token_id: int, text: str, c: CompletionOutput, special_ids: set[int]) -> dict:
    lp = c.logprobs[-1].sampled.logprob if c.logprobs else None
    return {"id": token_id, "text": text, "logprob": lp, "special": token_id in special_ids}


async def _parse(request: Request, client: EngineClient) -> TGIRequest:
    return await read_request_model(request, client.cfg.max_request_bytes_int, TGIRequest)


async def _submit(request: Request, client: EngineClient):
    arrival = time.monotonic()
    req = await _parse(request, client)
    params = tgi_params(req, client.cfg)
    if req.parameters.details:
        params = params.replace(logprobs=0)  # details report each token's logprob
    lora = None
    if req.parameters.adapter_id is not None:  # TGI's multi-LoRA field: an adapter's name
        client.check_model(req.parameters.adapter_id)
        lora = client.loras.get(req.parameters.adapter_id)
    client.check_accepting()
    ids = await client.encode(req.inputs)
    try:
        stream = await client.submit(client.new_id("tgi"), ids, params, arrival, lora)
    except APIError as e:
        if e.status == 400 and e.param == "response_format":  # the engine's name for it
            e.param = "parameters.grammar"
        raise
    return req, stream


def _details(req: TGIRequest, c: CompletionOutput, text_of: TokenText,
             special_ids: set[int]) -> dict:
    tokens = []
    for pos in c.logprobs or []:
        tid = pos.sampled.token_id
        tokens.append({"id": tid, "text": text_of(tid), "logprob": pos.sampled.logprob,
                       "special": tid in special_ids})
    return {"finish_reason": _finish_reason(c), "generated_tokens": len(c.token_ids),
            "seed": req.parameters.seed, "prefill": [], "tokens": tokens}


def _special_ids(client: EngineClient) -> set[int]:
    return set(getattr(client.tokenizer, "all_special_ids", []) or [])


async def generate(request: Request, client: EngineClient) -> Response:
    """Handle /generate: `{"generated_text": ..., "details": ...}`."""
    req, stream = await _submit(request, client)
    finals = await client.wait_final(request, [stream])
    if finals is None:
        return Response(status_code=CLIENT_CLOSED_STATUS)
    out: RequestOutput = finals[0]
    err = output_error(out)
    if err is not None:
        raise err
    c = out.outputs[0]
    text = (req.inputs + c.text) if req.parameters.return_full_text else c.text
    body: dict = {"generated_text": text}
    if req.parameters.details:
        body["details"] = _details(req, c, client.token_text, _special_ids(client))
    return JSONResponse(body)


async def generate_stream(request: Request, client: EngineClient) -> Response:
    """Handle /generate_stream: one SSE event per engine output, the last with the full text."""
    req, stream = await _submit(request, client)
    special = _special_ids(client)

    async def events():
        try:
            async for out in stream:
                err = output_error(out)
                if err is not None:
                    yield error_event(err)
                    return
                c = out.outputs[0]
                tid = c.token_ids[-1] if c.token_ids else -1
                event = {"index": len(c.token_ids), "token": _token(tid, c.delta_text, c, special),
                         "generated_text": None, "details": None}
                if out.finished:
                    text = c.text
                    if req.parameters.return_full_text:
                        text = req.inputs + text
                    event["generated_text"] = text
                    event["details"] = {"finish_reason": _finish_reason(c),
                                        "generated_tokens": len(c.token_ids),
                                        "seed": req.parameters.seed}
                yield sse_event(event)
        except Exception as e:  # the engine died or the server is shutting down
            yield error_event(engine_error(e))

    return SSEResponse(events(), on_close=stream.abort)
