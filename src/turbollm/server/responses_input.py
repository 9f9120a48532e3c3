"""The Responses API request (POST /v1/responses) and its translation into a chat request.

A response is a chat turn with other names: `input` (a string, or message / function_call /
function_call_output items) becomes chat messages after `instructions` (a system message) and
the stored turns of `previous_response_id`; flat function tools become chat tools; `text.format`
becomes `response_format`; `max_output_tokens` becomes `max_tokens`. The chat path then does the
rest (template, tool parsing, grammars), so both endpoints behave the same.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from turbollm.server.errors import APIError, from_validation_error
from turbollm.server.protocol import ChatCompletionRequest, _Strict

_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(_Strict):
    """POST /v1/responses (the fields we support; unknown ones are ignored, as OpenAI does)."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # an extension, as vLLM
    stream: bool = False
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None


def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad("content must be a string or a list of text parts", where)
    texts = []
    for k, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS \
                or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise APIError(400, f"only text content parts are supported, got {str(kind)[:50]!r}",
                           f"{where}[{k}]", "unsupported")
        texts.append(part["text"])
    return "".join(texts)


def input_messages(items: str | list[dict]) -> list[dict]:
    """`input` as chat messages (consecutive function_call items form one assistant turn)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _bad(f"message role must be user, system, developer or assistant, got "
                           f"{str(role)[:30]!r}", f"{where}.role")
            out.append({"role": role, "content": _text_of(item.get("content"),
                                                          f"{where}.content")})
        elif kind == "function_call":
            name, args, call_id = item.get("name"), item.get("arguments"), item.get("call_id")
            if not (isinstance(name, str) and isinstance(args, str) and isinstance(call_id, str)):
                raise _bad("a function_call item needs string name, arguments and call_id", where)
            call = {"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": args}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise _bad("a function_call_output item needs a string call_id", where)
            out.append({"role": "tool", "tool_call_id": call_id,
                        "content": _text_of(output, f"{where}.output")})
        else:
            raise APIError(400, f"input items of type {str(kind)[:50]!r} are not supported "
                           "(message, function_call, function_call_output are)", where,
                           "unsupported")
    return out


def _chat_tools(tools: list[dict]) -> list[dict]:
    out = []
    for i, t in enumerate(tools):
        if t.get("type") != "function":
            raise APIError(400, f"only function tools are supported, got "
                           f"{str(t.get('type'))[:50]!r}", f"tools[{i}]", "unsupported")
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice: str | dict | None) -> str | dict | None:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if fmt is None or fmt == {"type": "text"}:
        return None
    if not isinstance(fmt, dict):
        raise _bad("text.format must be an object", "text.format")
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    return fmt  # json_object, or a type the chat path refuses with its own message


def to_chat_request(req: ResponsesRequest, history: list[dict]) -> ChatCompletionRequest:
    """The chat request that answers `req` after the earlier turns `history`."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    messages += history + input_messages(req.input)
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": False}
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("seed", "seed"),
                         ("parallel_tool_calls", "parallel_tool_calls"), ("user", "user")):
        if getattr(req, ours) is not None:
            body[theirs] = getattr(req, ours)
    if req.tools:
        body["tools"] = _chat_tools(req.tools)
    if req.tool_choice is not None:
        body["tool_choice"] = _chat_tool_choice(req.tool_choice)
    fmt = _response_format(req.text)
    if fmt is not None:
        body["response_format"] = fmt
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None
