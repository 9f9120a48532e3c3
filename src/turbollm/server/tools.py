"""Tool calling on chat completions: check `tools` / `tool_choice`, show the tools to the model,
and read its calls back out.

Format: Hermes-style, which Qwen2.5, Hermes and SmolLM-family templates use: a call is
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. A template that takes `tools`
renders them itself; for one that does not (the bundled SmolLM2's), the tools and the format are
described in a system message. `tool_choice` "required" or a named function is enforced with
the grammar engine (the answer is a JSON object `{"name", "arguments"}` matching the function's
parameters schema, so the call always parses); "auto" lets the model choose and parses any
`<tool_call>` blocks out of its answer; "none" shows no tools.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from turbollm.server.errors import APIError
from turbollm.server.protocol import ChatCompletionRequest
from turbollm.structured_spec import StructuredOutputSpec

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ToolPlan:
    """What a request's tools mean for this generation."""

    tools: list[dict]  # the OpenAI function definitions, as dicts
    mode: str  # "auto" | "required" | "named"
    # required / named: the output is one JSON call object, enforced by this constraint
    constraint: StructuredOutputSpec | None = None

    @property
    def forced(self) -> bool:
        return self.constraint is not None


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param, "invalid_value")


def plan_tools(req: ChatCompletionRequest) -> ToolPlan | None:
    """The request's tool plan (None: no tools in play); 400 for inconsistent fields."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise _bad("tool function names must be unique", "tools")
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise _bad('tool_choice must be "none", "auto", "required" or {"type": "function", '
                       '"function": {"name": ...}}', "tool_choice")
        if name not in names:
            raise _bad(f"tool_choice names {name[:64]!r}, which is not in tools", "tool_choice")
        mode, chosen = "named", [t for t in tools if t["function"]["name"] == name]
    elif choice in ("none", "auto", "required"):
        mode, chosen = choice, tools
    else:
        raise _bad('tool_choice must be "none", "auto", "required" or a named function',
                   "tool_choice")
    if mode == "none" or (mode == "auto" and not tools):
        return None
    if not tools:
        raise _bad(f"tool_choice {mode!r} needs tools", "tool_choice")
    constraint = None
    if mode in ("required", "named"):
        schemas = [_call_schema(t["function"]) for t in chosen]
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        try:
            constraint = StructuredOutputSpec.json(schema)
        except ValueError as e:
            raise _bad(f"tool parameters: {e}", "tools") from None
    return ToolPlan(tools, mode, constraint)


def _call_schema(fn: dict) -> dict:
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"type": "string", "enum": [fn["name"]]},
                                             "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


# ----- prompt -----
def template_takes_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def tool_system_prompt(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You can call functions. These are available, as JSON signatures:\n<tools>\n"
            f"{listing}\n</tools>\nTo call one, answer with\n{OPEN}\n"
            '{"name": <function name>, "arguments": <arguments as a JSON object>}\n'
            f"{CLOSE}")


def with_tool_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Messages with the tools described in the system message (templates without `tools`)."""
    prompt = tool_system_prompt(tools)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = dict(messages[0], content=f"{messages[0]['content']}\n\n{prompt}")
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def call_text(tool_calls: list[dict]) -> str:
    """An earlier assistant turn's tool calls as the model writes them (for templates without
    tool support)."""
    out = []
    for c in tool_calls:
        fn = c.get("function", {})
        out.append(f'{OPEN}\n{{"name": {json.dumps(fn.get("name"))}, "arguments": '
                   f'{fn.get("arguments") or "{}"}}}\n{CLOSE}')
    return "\n".join(out)


# ----- answer -----
def new_call(name: str, arguments: Any) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _call_of(obj: Any, names: set[str]) -> dict | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return new_call(obj["name"], args) if isinstance(args, dict) else None


def parse_answer(plan: ToolPlan, text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished answer."""
    names = {t["function"]["name"] for t in plan.tools}
    if plan.forced:
        try:
            call = _call_of(json.loads(text), names)
        except json.JSONDecodeError:
            call = None
        return (None, [call]) if call else (text, [])
    calls = []
    for body in _CALL_BLOCK.findall(text):
        try:
            call = _call_of(json.loads(body), names)
        except json.JSONDecodeError:
            call = None
        if call is None:
            return text, []  # a malformed block: give the text back as it is
        calls.append(call)
    if not calls:
        return text, []
    content = _CALL_BLOCK.sub("", text).strip()
    return content or None, calls


def safe_prefix_len(text: str) -> int:
    """How much of a streamed answer can go out as content: everything before a `<tool_call>`
    tag or before a tail that may be the start of one."""
    at = text.find(OPEN)
    if at >= 0:
        return at
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return len(text) - k
    return len(text)


class ToolStream:
    """One streamed choice with tools in play: content goes out as it comes, up to a
    `<tool_call>` tag ("auto"; nothing at all when the call is forced), and the calls go out
    whole when the answer is finished (as one tool_calls delta each, which the OpenAI clients
    accumulate like fragments)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters of text already sent as content

    def feed(self, delta: str) -> str:
        """The content that may go out now."""
        self.text += delta
        if self.plan.forced:
            return ""
        safe = safe_prefix_len(self.text)
        if safe <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def finish(self, finish_reason: str) -> tuple[str, list[dict], str]:
        """(content still to send, tool calls, finish reason) at the end of the answer."""
        if finish_reason == "stop":
            content, calls = parse_answer(self.plan, self.text)
            if calls:
                sent = self.text[:self.sent]
                content = content or ""
                rest = content[len(sent):] if content.startswith(sent) else ""
                return rest, calls, "tool_calls"
        return self.text[self.sent:], [], finish_reason
