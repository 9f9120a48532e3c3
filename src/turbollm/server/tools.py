"""Tool calling on chat completions: check `tools` / `tool_choice`, show the tools to the model,
and read its calls back out.

A template that takes `tools` renders them itself, and its model answers in its family's format,
read by the parser `--tool-call-parser` names (server/tool_parsers.py; `auto` detects it from the
template). For a template that does not (the bundled SmolLM2's), the tools and the Hermes format
(`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) are described in a system message.
`tool_choice` "required" or a named function is enforced with the grammar engine (the answer is
a JSON object `{"name", "arguments"}` matching the function's parameters schema, so the call
always parses); "auto" lets the model choose and parses its calls out of the answer; "none"
shows no tools.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from turbollm.server.errors import APIError
from turbollm.server.protocol import ChatCompletionRequest
from turbollm.server.tool_parsers import HermesParser, ToolCallParser, call_of
from turbollm.structured_spec import StructuredOutputSpec

OPEN, CLOSE = "<tool_call>", "</tool_call>"  # the hermes format our own tool prompt teaches


@dataclass
class ToolPlan:
    """What a request's tools mean for this generation."""

    tools: list[dict]  # the OpenAI function definitions, as dicts
    mode: str  # "auto" | "required" | "named"
    # required / named: the output is one JSON call object, enforced by this constraint
    constraint: StructuredOutputSpec | None = None
    # auto: how calls are read out of the answer (the model family's format)
    parser: ToolCallParser = field(default_factory=HermesParser)

    @property
    def forced(self) -> bool:
        return self.constraint is not None


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param, "invalid_value")


def plan_tools(req: ChatCompletionRequest, parser: ToolCallParser | None = None
               ) -> ToolPlan | None:
    """The request's tool plan (None: no tools in play); 400 for inconsistent fields. `parser`
    reads calls in "auto" mode (default: hermes)."""
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
    return ToolPlan(tools, mode, constraint, parser or HermesParser())


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
def parse_answer(plan: ToolPlan, text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished answer."""
    names = {t["function"]["name"] for t in plan.tools}
    if plan.forced:  # the grammar made the answer one JSON call object, whatever the family
        try:
            call = call_of(json.loads(text), names)
        except json.JSONDecodeError:
            call = None
        return (None, [call]) if call else (text, [])
    return plan.parser.parse(text, names)


class ToolStream:
    """One streamed choice with tools in play: content goes out as it comes, up to a
    call marker of the parser's format ("auto"; nothing at all when the call is forced), and the calls go out
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
        safe = self.plan.parser.safe_prefix_len(self.text)
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
