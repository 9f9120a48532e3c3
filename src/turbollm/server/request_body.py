"""Reading a JSON request body safely: size limit first, then strict UTF-8 and strict JSON."""
from __future__ import annotations

import json
import re

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from turbollm.server.errors import APIError, from_validation_error

# A \uD800-\uDFFF escape in the raw text: json.loads turns an unpaired one into a lone
# surrogate, which is not a character and cannot be encoded back to UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _reject_constant(name: str):
    # json.loads accepts NaN, Infinity and -Infinity; JSON does not.
    raise ValueError(f"{name} is not valid JSON")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, or 413 as soon as it is known to exceed `max_bytes` (before parsing)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "invalid Content-Length header", None, "invalid_request")
        if int(declared) > max_bytes:
            raise APIError(413, f"the request body is larger than {max_bytes} bytes", None,
                           "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise APIError(413, f"the request body is larger than {max_bytes} bytes", None,
                           "request_too_large")
    return bytes(body)


def parse_json_object(raw: bytes) -> dict:
    """Decode a body as a JSON object; 400 for bad UTF-8, bad JSON, lone surrogates, non-objects."""
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object", None, "invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})", None,
                       "invalid_encoding") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError, NaN/Infinity and integers with too many digits.
        msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        raise APIError(400, f"the request body is not valid JSON: {msg}", None,
                       "invalid_json") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the request contains an unpaired UTF-16 surrogate escape "
                           "(\\ud800-\\udfff)", None, "invalid_encoding") from None
        except (ValueError, RecursionError):
            raise APIError(400, "the request body is not valid JSON", None,
                           "invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(obj).__name__}",
                       None, "invalid_json")
    return obj


async def read_json_object(request: Request, max_bytes: int) -> dict:
    """Size-checked, strictly decoded JSON object body."""
    return parse_json_object(await read_body(request, max_bytes))


async def read_request_model(request: Request, max_bytes: int, model: type[BaseModel]):
    """The body parsed strictly and validated into `model` (400 with `param` on failure)."""
    body = await read_json_object(request, max_bytes)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None


def usage_of(outputs) -> dict:
    """OpenAI `usage` over one or more RequestOutputs."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
             "total_tokens": prompt + completion}
    steps = sum(o.metrics.spec_steps for o in outputs)
    if steps:  # speculative decoding ran: how well its proposals did (an extension field)
        drafted = sum(o.metrics.spec_draft_tokens for o in outputs)
        accepted = sum(o.metrics.spec_accepted_tokens for o in outputs)
        usage["speculative"] = {"steps": steps, "draft_tokens": drafted,
                                "accepted_tokens": accepted,
                                "acceptance_rate": accepted / drafted if drafted else 0.0,
                                "mean_accepted_length": 1 + accepted / steps}
    return usage
