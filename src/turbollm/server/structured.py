"""The request fields that constrain the output -> one StructuredOutputSpec (or None).

OpenAI's `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema":
{"name", "schema", "strict"}}) and vLLM's extras (`guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar`, or the same inside `structured_outputs`). At most one may
be given; a malformed one is a 400 naming the field.
"""
from __future__ import annotations

from typing import Any

from turbollm.server.errors import APIError
from turbollm.server.protocol import _SamplingFields
from turbollm.structured_spec import StructuredOutputSpec

# structured_outputs keys (vLLM) -> our constructor
_STRUCTURED_KEYS = {"json": StructuredOutputSpec.json, "regex": StructuredOutputSpec.regex,
                    "choice": StructuredOutputSpec.choice,
                    "grammar": StructuredOutputSpec.grammar}


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param, "invalid_value")


def _from_response_format(rf: dict[str, Any]) -> StructuredOutputSpec | None:
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputSpec.json_object()
    if kind != "json_schema":
        raise _bad(f"response_format type must be 'text', 'json_object' or 'json_schema', got "
                   f"{str(kind)[:50]!r}", "response_format.type")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise _bad("response_format json_schema needs a 'json_schema' object with a 'schema'",
                   "response_format.json_schema")
    schema = js.get("schema")
    if schema is None:  # a name without a schema: any JSON object
        return StructuredOutputSpec.json_object()
    return StructuredOutputSpec.json(schema)


def _from_structured_outputs(so: dict[str, Any]) -> StructuredOutputSpec | None:
    given = [(k, v) for k, v in so.items() if v is not None and v is not False]
    if so.get("json_object") is True:
        given = [(k, v) for k, v in given if k != "json_object"]
        if given:
            raise _bad("structured_outputs takes one constraint", "structured_outputs")
        return StructuredOutputSpec.json_object()
    known = [(k, v) for k, v in given if k in _STRUCTURED_KEYS]
    if len(known) > 1:
        raise _bad("structured_outputs takes one constraint", "structured_outputs")
    if not known:
        return None
    k, v = known[0]
    return _STRUCTURED_KEYS[k](v)


def structured_output_of(req: _SamplingFields) -> StructuredOutputSpec | None:
    """The request's output constraint; APIError 400 for a malformed or doubled one."""
    found: list[tuple[str, Any]] = []
    fields = (("response_format", _from_response_format),
              ("structured_outputs", _from_structured_outputs),
              ("guided_json", StructuredOutputSpec.json),
              ("guided_regex", StructuredOutputSpec.regex),
              ("guided_choice", StructuredOutputSpec.choice),
              ("guided_grammar", StructuredOutputSpec.grammar))
    for name, make in fields:
        value = getattr(req, name, None)
        if value is None:
            continue
        try:
            spec = make(value)
        except ValueError as e:
            raise _bad(str(e), name) from None
        if spec is not None:
            found.append((name, spec))
    if len(found) > 1:
        raise _bad(f"give one output constraint, not {' and '.join(n for n, _ in found)}",
                   found[1][0])
    return found[0][1] if found else None


def tgi_grammar(grammar: dict[str, Any]) -> StructuredOutputSpec:
    """TGI's `parameters.grammar`: {"type": "json", "value": <schema>} or {"type": "regex",
    "value": <pattern>}; 400 naming parameters.grammar otherwise."""
    kind, value = grammar.get("type"), grammar.get("value")
    try:
        if kind == "json" and isinstance(value, (dict, str)):
            return StructuredOutputSpec.json(value)
        if kind == "regex" and isinstance(value, str):
            return StructuredOutputSpec.regex(value)
    except ValueError as e:
        raise _bad(str(e), "parameters.grammar") from None
    raise _bad('parameters.grammar must be {"type": "json", "value": <JSON schema>} or '
               '{"type": "regex", "value": <pattern>}', "parameters.grammar")
