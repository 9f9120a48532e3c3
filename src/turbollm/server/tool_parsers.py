"""Reading tool calls out of an answer, one parser per model family's format.

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen2.5,
  SmolLM-family templates, and the format our own tool prompt teaches a template without tools).
- qwen: hermes blocks, whose body may also be Qwen3-Coder's XML form
  `<function=NAME><parameter=KEY>VALUE</parameter>...</function>`.
- llama3_json: Llama 3.1-3.3's JSON calls, `{"name": ..., "parameters": {...}}`, the whole answer,
  optionally after `<|python_tag|>`, several joined by `;`.
- mistral: `[TOOL_CALLS]` then a JSON list of calls (v3 tokenizers) or `NAME[ARGS]{...}` per call
  (v11 and later; `[CALL_ID]...` before `[ARGS]` is skipped).

`auto` picks by what the chat template writes. Markers that are special tokens (`[TOOL_CALLS]`,
`<|python_tag|>`) are kept in the answer for these requests (skip_special_tokens off), else
detokenization would erase the very marker that tells a call from text.
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

TOOL_CALL_PARSERS = ("auto", "hermes", "qwen", "llama3_json", "mistral")


def new_call(name: str, arguments: Any) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def call_of(obj: Any, names: set[str]) -> dict | None:
    """An OpenAI tool call from a parsed `{"name", "arguments"|"parameters"}` object, or None
    when it names no offered function or its arguments are not an object."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return new_call(obj["name"], args) if isinstance(args, dict) else None


def _json_call(body: str, names: set[str]) -> dict | None:
    try:
        return call_of(json.loads(body), names)
    except json.JSONDecodeError:
        return None


def _partial_marker_tail(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ToolCallParser:
    """One family's call format. `parse` reads a finished answer; `safe_prefix_len` says how
    much of a streamed answer is surely content (everything before a marker, or before a tail
    that may be the start of one)."""

    name = ""
    marker = ""
    special_marker = False  # the marker is a special token: keep special tokens in the answer

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[dict]]:
        raise NotImplementedError

    def safe_prefix_len(self, text: str) -> int:
        at = text.find(self.marker)
        if at >= 0:
            return at
        return len(text) - _partial_marker_tail(text, self.marker)


class HermesParser(ToolCallParser):
    name, marker = "hermes", "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def call_in_block(self, body: str, names: set[str]) -> dict | None:
        return _json_call(body, names)

    def parse(self, text, names):
        calls = []
        for body in self._block.findall(text):
            call = self.call_in_block(body, names)
            if call is None:
                return text, []  # a malformed block: give the text back as it is
            calls.append(call)
        if not calls:
            return text, []
        content = self._block.sub("", text).strip()
        return content or None, calls


class QwenParser(HermesParser):
    name = "qwen"
    _function = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.DOTALL)
    _parameter = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?(?:</parameter>|(?=<parameter=)|$)",
                            re.DOTALL)

    def call_in_block(self, body, names):
        m = self._function.match(body)
        if m is None:
            return _json_call(body, names)
        name, inner = m.group(1), m.group(2)
        if name not in names:
            return None
        args = {}
        for key, value in self._parameter.findall(inner):
            try:  # numbers, booleans, lists and objects are written as JSON; strings are bare
                args[key] = json.loads(value)
            except json.JSONDecodeError:
                args[key] = value
        return new_call(name, args)


class Llama3JsonParser(ToolCallParser):
    name, marker, special_marker = "llama3_json", "<|python_tag|>", True

    def parse(self, text, names):
        at = text.find(self.marker)
        content, body = (text[:at].strip(), text[at + len(self.marker):]) if at >= 0 \
            else ("", text)
        body = body.strip()
        if not body.startswith("{"):
            return text, []
        calls, pos, decoder = [], 0, json.JSONDecoder()
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return text, []
            call = call_of(obj, names)
            if call is None:
                return text, []
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return content or None, calls

    def safe_prefix_len(self, text):
        stripped = text.lstrip()
        if not stripped or stripped.startswith("{"):
            return 0  # an answer that opens with JSON is a call until it proves otherwise
        return super().safe_prefix_len(text)


class MistralParser(ToolCallParser):
    name, marker, special_marker = "mistral", "[TOOL_CALLS]", True

    def parse(self, text, names):
        at = text.find(self.marker)
        if at < 0:
            return text, []
        content = text[:at].strip()
        calls = []
        for segment in text[at:].split(self.marker)[1:]:
            found = self._segment_calls(segment.strip(), names)
            if found is None:
                return text, []
            calls.extend(found)
        return (content or None, calls) if calls else (text, [])

    @staticmethod
    def _segment_calls(seg: str, names: set[str]) -> list[dict] | None:
        if "[ARGS]" in seg:  # v11+: NAME[ARGS]{...}, maybe NAME[CALL_ID]id[ARGS]{...}
            name, _, args = seg.partition("[ARGS]")
            call = call_of({"name": name.split("[CALL_ID]")[0].strip(),
                            "arguments": _loads_or_none(args)}, names)
            return [call] if call else None
        obj = _loads_or_none(seg)
        objs = obj if isinstance(obj, list) else [obj]
        calls = [call_of(o, names) for o in objs]
        return calls if calls and all(calls) else None


def _loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


PARSERS: dict[str, type[ToolCallParser]] = {
    p.name: p for p in (HermesParser, QwenParser, Llama3JsonParser, MistralParser)}


def detect_parser(template: str | None) -> str:
    """The format a chat template teaches its model (hermes for one that shows no tools: our
    own tool prompt teaches hermes)."""
    if not template or "tools" not in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<function=" in template:
        return "qwen"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


def make_parser(requested: str, template: str | None) -> ToolCallParser:
    """The parser for `--tool-call-parser` (`auto`: detected from the template)."""
    if requested not in TOOL_CALL_PARSERS:
        raise ValueError(f"tool_call_parser must be one of {TOOL_CALL_PARSERS}, got "
                         f"{requested!r}")
    return PARSERS[detect_parser(template) if requested == "auto" else requested]()
