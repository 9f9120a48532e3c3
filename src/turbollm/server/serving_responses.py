"""POST /v1/responses, GET and DELETE /v1/responses/{id}: OpenAI's Responses API over the chat
path (server/responses_input.py translates the request, serving_chat.start_chat runs it).

Output items: one `message` with the answer's text (left out when the answer is only tool
calls), then one `function_call` per call. Streaming sends the official event sequence:
response.created, response.in_progress, then per item output_item.added, its parts and deltas,
output_item.done, and response.completed (response.incomplete when max_output_tokens cut the
answer). Every event carries `type` and a `sequence_number`.
"""
from __future__ import annotations

import secrets
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from turbollm.engine.outputs import CompletionOutput, RequestOutput
from turbollm.server.engine_client import (CLIENT_CLOSED_STATUS, EngineClient, engine_error,
                                           output_error)
from turbollm.server.errors import APIError
from turbollm.server.request_body import read_request_model
from turbollm.server.responses_input import ResponsesRequest, input_messages, to_chat_request
from turbollm.server.responses_store import StoredResponse
from turbollm.server.serving_chat import StartedChat, start_chat
from turbollm.server.sse import SSEResponse, dumps
from turbollm.server.tools import ToolStream, parse_answer


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _message_item(item_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [_text_part(text)] if status == "completed" else []}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(call: dict, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": _item_id("fc"), "call_id": call["id"],
            "name": call["function"]["name"], "arguments": arguments, "status": status}


class ResponseBuilder:
    """The Response object of one request, in progress and final."""

    def __init__(self, started: StartedChat, req: ResponsesRequest):
        self.started, self.req = started, req
        self.id = started.request_id
        self.created_at = int(time.time())

    def envelope(self, status: str, output: list[dict], out: RequestOutput | None = None,
                 finish: str | None = None) -> dict:
        req = self.req
        usage = None
        if out is not None:
            prompt, generated = len(out.prompt_token_ids), out.num_generated_tokens
            usage = {"input_tokens": prompt,
                     "input_tokens_details": {"cached_tokens": out.metrics.num_cached_tokens},
                     "output_tokens": generated,
                     "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": prompt + generated}
        return {"id": self.id, "object": "response", "created_at": self.created_at,
                "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"}
                if finish == "length" else None,
                "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
                "model": self.started.model, "output": output,
                "parallel_tool_calls": req.parallel_tool_calls is not False,
                "previous_response_id": req.previous_response_id,
                "temperature": 1.0 if req.temperature is None else req.temperature,
                "top_p": 1.0 if req.top_p is None else req.top_p,
                "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
                "text": req.text or {"format": {"type": "text"}}, "truncation": "disabled",
                "usage": usage, "metadata": req.metadata or {}, "store": req.store}

    def answer(self, c: CompletionOutput) -> tuple[str | None, list[dict], str]:
        """(text, tool calls, finish reason) of the finished answer."""
        finish, content, calls = c.finish_reason, c.text, []
        if self.started.plan is not None and finish == "stop":
            content, calls = parse_answer(self.started.plan, c.text)
        return content, calls, finish

    def final(self, out: RequestOutput, content: str | None, calls: list[dict], finish: str,
              message_id: str | None = None, call_items: list[dict] | None = None) -> dict:
        output = []
        if content is not None or not calls:
            output.append(_message_item(message_id or _item_id("msg"), content or "",
                                        "completed"))
        output += call_items if call_items is not None else \
            [_call_item(c, c["function"]["arguments"], "completed") for c in calls]
        status = "incomplete" if finish == "length" else "completed"
        return self.envelope(status, output, out, finish)

    def store(self, client: EngineClient, response: dict, content: str | None,
              calls: list[dict]) -> None:
        if not self.req.store:
            return
        answer = {"role": "assistant", "content": content}
        if calls:
            answer["tool_calls"] = calls
        client.responses.put(self.id, StoredResponse(
            response, input_messages(self.req.input) + [answer], self.req.previous_response_id))


async def create_response(request: Request, client: EngineClient) -> Response:
    """Handle POST /v1/responses."""
    arrival = time.monotonic()
    req = await read_request_model(request, client.cfg.max_request_bytes_int, ResponsesRequest)
    history: list[dict] = []
    if req.previous_response_id is not None:
        history = client.responses.history(req.previous_response_id)
        if history is None:
            raise APIError(404, f"previous response {req.previous_response_id[:80]!r} is not "
                           "stored (never was, store was false, or it expired)",
                           "previous_response_id", "previous_response_not_found")
    started = await start_chat(client, to_chat_request(req, history), "resp", arrival)
    builder = ResponseBuilder(started, req)
    if req.stream:
        return SSEResponse(_events(builder, client), on_close=started.stream.abort)
    finals = await client.wait_final(request, [started.stream])
    if finals is None:
        return Response(status_code=CLIENT_CLOSED_STATUS)
    out = finals[0]
    err = output_error(out)
    if err is not None:
        raise err
    content, calls, finish = builder.answer(out.outputs[0])
    response = builder.final(out, content, calls, finish)
    builder.store(client, response, content, calls)
    return JSONResponse(response)


class _Events:
    """SSE events, numbered."""

    def __init__(self):
        self.seq = 0

    def __call__(self, kind: str, **fields) -> bytes:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {dumps(body)}\n\n".encode("utf-8")


async def _events(builder: ResponseBuilder, client: EngineClient):
    """The streamed Response: text deltas as they come (held back from a tool-call marker on),
    function calls whole at the end, then the final response."""
    event = _Events()
    yield event("response.created", response=builder.envelope("in_progress", []))
    yield event("response.in_progress", response=builder.envelope("in_progress", []))
    plan = builder.started.plan
    tools = ToolStream(plan) if plan is not None else None
    msg_id, sent = _item_id("msg"), ""
    try:
        async for out in builder.started.stream:
            err = output_error(out)
            if err is not None:
                yield event("error", code=err.code, message=err.message, param=err.param)
                return
            c = out.outputs[0]
            delta = tools.feed(c.delta_text) if tools is not None else c.delta_text
            calls, finish = [], c.finish_reason
            if finish is not None and tools is not None:
                rest, calls, finish = tools.finish(finish)
                delta += rest
            if delta and not sent:
                yield event("response.output_item.added", output_index=0,
                            item=_message_item(msg_id, "", "in_progress"))
                yield event("response.content_part.added", item_id=msg_id, output_index=0,
                            content_index=0, part=_text_part(""))
            if delta:
                sent += delta
                yield event("response.output_text.delta", item_id=msg_id, output_index=0,
                            content_index=0, delta=delta, logprobs=[])
            if finish is None:
                continue
            if sent or not calls:
                if not sent:  # an empty answer is still a message, as in the JSON response
                    yield event("response.output_item.added", output_index=0,
                                item=_message_item(msg_id, "", "in_progress"))
                    yield event("response.content_part.added", item_id=msg_id,
                                output_index=0, content_index=0, part=_text_part(""))
                yield event("response.output_text.done", item_id=msg_id, output_index=0,
                            content_index=0, text=sent, logprobs=[])
                yield event("response.content_part.done", item_id=msg_id, output_index=0,
                            content_index=0, part=_text_part(sent))
                yield event("response.output_item.done", output_index=0,
                            item=_message_item(msg_id, sent, "completed"))
            first = 1 if (sent or not calls) else 0
            call_items = []
            for k, call in enumerate(calls):
                index, args = first + k, call["function"]["arguments"]
                item = _call_item(call, "", "in_progress")
                yield event("response.output_item.added", output_index=index, item=item)
                yield event("response.function_call_arguments.delta", item_id=item["id"],
                            output_index=index, delta=args)
                yield event("response.function_call_arguments.done", item_id=item["id"],
                            output_index=index, arguments=args, name=item["name"])
                done = dict(item, arguments=args, status="completed")
                call_items.append(done)
                yield event("response.output_item.done", output_index=index, item=done)
            content = sent if (sent or not calls) else None
            response = builder.final(out, content, calls, finish, msg_id, call_items)
            builder.store(client, response, content, calls)
            kind = "response.incomplete" if finish == "length" else "response.completed"
            yield event(kind, response=response)
            return
    except Exception as e:  # the engine died or the server is shutting down
        err = engine_error(e)
        yield event("error", code=err.code, message=err.message, param=err.param)


def get_response(client: EngineClient, response_id: str) -> JSONResponse:
    """GET /v1/responses/{id}: a stored response, or 404."""
    entry = client.responses.get(response_id)
    if entry is None:
        raise APIError(404, f"no stored response {response_id[:80]!r}", "response_id",
                       "not_found")
    return JSONResponse(entry.response)


def delete_response(client: EngineClient, response_id: str) -> JSONResponse:
    """DELETE /v1/responses/{id}."""
    if not client.responses.delete(response_id):
        raise APIError(404, f"no stored response {response_id[:80]!r}", "response_id",
                       "not_found")
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})
