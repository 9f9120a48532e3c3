"""POST /v1/chat/completions: render the conversation with the chat template, then generate."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from turbollm.chat import render_chat
from turbollm.engine.outputs import RequestOutput
from turbollm.engine.async_engine import RequestStream
from turbollm.server.engine_client import (CLIENT_CLOSED_STATUS, EngineClient, engine_error,
                                           output_error)
from turbollm.server.errors import APIError, error_event
from turbollm.server.logprobs import chat_logprobs
from turbollm.server.params import chat_params
from turbollm.server.protocol import ChatCompletionRequest, ChatMessage
from turbollm.server.request_body import read_request_model, usage_of
from turbollm.server.sse import DONE, SSEResponse, sse_event
from turbollm.server.tools import (ToolPlan, ToolStream, call_text, parse_answer, plan_tools,
                                   template_takes_tools, with_tool_prompt)


def _tool_call_dicts(m: ChatMessage, template_tools: bool) -> list[dict]:
    """An assistant turn's tool calls for a template that takes them (arguments as a dict, the
    Hugging Face convention; text that is not JSON is passed as it is)."""
    out = []
    for c in m.tool_calls or []:
        try:
            args = json.loads(c.function.arguments)
        except json.JSONDecodeError:
            args = c.function.arguments
        out.append({"type": "function", "id": c.id,
                    "function": {"name": c.function.name, "arguments": args}})
    return out


def _message_dicts(messages: list[ChatMessage], template_tools: bool = False) -> list[dict]:
    """Messages as the chat template expects them (text parts joined; other parts refused)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"only text content parts are supported, got "
                                   f"{part.type[:50]!r}", f"messages.[{i}].content",
                                   "unsupported")
                texts.append(part.text)
            content = "".join(texts)
        d = {"role": m.role, "content": content or ""}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            if template_tools:
                d["tool_calls"] = _tool_call_dicts(m, template_tools)
            else:  # the template knows no tool calls: they go in as the text the model writes
                calls = call_text([c.model_dump() for c in m.tool_calls])
                d["content"] = f"{d['content']}\n{calls}" if d["content"] else calls
        out.append(d)
    return out


def _render_and_encode(client: EngineClient, messages: list[dict], template: str | None,
                       tools: list[dict] | None = None, template_tools: bool = False
                       ) -> list[int]:
    """Token ids of the conversation, exactly as the offline LLM.chat builds them. A template
    sent in the request renders in a child process with a time limit (server/template_render)."""
    tokenizer = client.tokenizer
    if tools and not (template_tools and template is None):
        messages = with_tool_prompt(messages, tools)  # the template cannot show them
        tools = None
    try:
        if template is None:
            text = render_chat(tokenizer, messages, tools=tools)
        else:
            text = client.request_template_renderer().render(messages, template)
    except Exception as e:  # template errors (raise_exception, sandbox violations, the time
        # limit) are the request's fault: a bad role order, or a template the operator let
        # clients send
        detail = str(e) if template is not None else f"{type(e).__name__}: {e}"
        raise APIError(400, f"could not apply the chat template: {detail}", "messages",
                       "invalid_chat") from None
    return list(tokenizer(text, add_special_tokens=False).input_ids)


@dataclass
class StartedChat:
    """A chat request handed to the engine."""

    model: str  # the served name the request chose (the base model's or an adapter's)
    request_id: str
    plan: ToolPlan | None
    stream: RequestStream


async def start_chat(client: EngineClient, req: ChatCompletionRequest, id_prefix: str,
                     arrival: float) -> StartedChat:
    """Check a chat request, render and tokenize it, and queue it (chat completions and the
    Responses API both come through here)."""
    model = client.check_model(req.model)
    lora = client.loras.get(model)  # resolved now: an unload meanwhile does not change it
    template_tools = template_takes_tools(getattr(client.tokenizer, "chat_template", None))
    # the model answers in its family's format only where its own template showed the tools;
    # elsewhere our tool prompt taught it hermes
    parser = client.tool_parser if template_tools and req.chat_template is None else None
    params = chat_params(req, client.cfg, parser)
    plan = plan_tools(req, parser)
    messages = _message_dicts(req.messages, template_tools and req.chat_template is None)
    client.check_accepting()
    ids = await client.run_tokenizer(_render_and_encode, client, messages, req.chat_template,
                                     plan.tools if plan else None, template_tools)
    rid = client.new_id(id_prefix)
    return StartedChat(model, rid, plan, await client.submit(rid, ids, params, arrival, lora))


async def create_chat_completion(request: Request, client: EngineClient) -> Response:
    """Handle /v1/chat/completions."""
    arrival = time.monotonic()
    req = await read_request_model(request, client.cfg.max_request_bytes_int,
                                   ChatCompletionRequest)
    started = await start_chat(client, req, "chatcmpl", arrival)
    stream = started.stream
    ctx = _Ctx(client, started.request_id, started.model, req, started.plan)
    if req.stream:
        return SSEResponse(_stream(ctx, stream), on_close=stream.abort)
    finals = await client.wait_final(request, [stream])
    if finals is None:
        return Response(status_code=CLIENT_CLOSED_STATUS)
    return JSONResponse(ctx.full_response(finals[0]))


class _Ctx:
    """Per-request values the response builders share."""

    def __init__(self, client: EngineClient, rid: str, model: str, req: ChatCompletionRequest,
                 plan: ToolPlan | None = None):
        self.id, self.model, self.req, self.plan = rid, model, req, plan
        self.created = int(time.time())
        self.text_of = client.token_text
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def _envelope(self, obj: str, choices: list, usage: dict | None) -> dict:
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}
        if usage is not None or (obj.endswith("chunk") and self.include_usage):
            body["usage"] = usage
        return body

    def full_response(self, out: RequestOutput) -> dict:
        err = output_error(out)
        if err is not None:
            raise err
        choices = []
        for c in out.outputs:
            message, finish = {"role": "assistant", "content": c.text}, c.finish_reason
            if self.plan is not None and finish == "stop":
                message["content"], calls = parse_answer(self.plan, c.text)
                if calls:
                    message["tool_calls"], finish = calls, "tool_calls"
            choices.append({"index": c.index, "message": message,
                            "logprobs": chat_logprobs(c.logprobs, self.text_of)
                            if c.logprobs is not None else None,
                            "finish_reason": finish})
        return self._envelope("chat.completion", choices, usage_of([out]))

    def chunk(self, index: int, delta: dict, logprobs: dict | None, finish: str | None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse_event(self._envelope("chat.completion.chunk", [choice], None))


async def _stream(ctx: _Ctx, stream):
    """SSE chunks: each choice's first chunk carries the role with its first content (sent when
    the first token is ready, so a client timing the first chunk measures the true time to
    first token, as with vLLM and llama-server), then content deltas, a finish chunk, usage,
    [DONE]."""
    n = ctx.req.n
    done = [False] * n
    started = [False] * n
    sent_lp = [0] * n
    tools = [ToolStream(ctx.plan) for _ in range(n)] if ctx.plan is not None else None
    try:
        async for out in stream:
            err = output_error(out)
            if err is not None:
                yield error_event(err)
                break
            for c in out.outputs:
                if done[c.index]:
                    continue
                lp = None
                if c.logprobs is not None and len(c.logprobs) > sent_lp[c.index]:
                    lp = chat_logprobs(c.logprobs[sent_lp[c.index]:], ctx.text_of)
                    sent_lp[c.index] = len(c.logprobs)
                delta, finish, calls = c.delta_text, c.finish_reason, []
                if tools is not None:  # hold back what may be a tool call
                    delta = tools[c.index].feed(c.delta_text)
                    if finish is not None:
                        rest, calls, finish = tools[c.index].finish(finish)
                        delta += rest
                if not started[c.index]:
                    yield ctx.chunk(c.index, {"role": "assistant", "content": delta}, lp, None)
                    started[c.index] = True
                elif delta or lp:
                    yield ctx.chunk(c.index, {"content": delta}, lp, None)
                if calls:
                    yield ctx.chunk(c.index, {"tool_calls": [
                        {"index": k, **call} for k, call in enumerate(calls)]}, None, None)
                if finish is not None:
                    yield ctx.chunk(c.index, {}, None, finish)
                    done[c.index] = True
            if out.finished:
                if ctx.include_usage:
                    yield sse_event(ctx._envelope("chat.completion.chunk", [], usage_of([out])))
                break
    except Exception as e:  # the engine died or the server is shutting down
        yield error_event(engine_error(e))
    yield DONE
