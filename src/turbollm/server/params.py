"""Request bodies -> SamplingParams, with the server's limits checked before anything is queued."""
from __future__ import annotations

from dataclasses import fields

from turbollm.sampling_params import SamplingParams
from turbollm.server.config import ServerConfig
from turbollm.server.errors import APIError
from turbollm.server.protocol import (ChatCompletionRequest, CompletionRequest, TGIRequest,
                                      _SamplingFields)
from turbollm.server.structured import structured_output_of, tgi_grammar
from turbollm.server.tool_parsers import ToolCallParser
from turbollm.server.tools import plan_tools

_SP_FIELDS = {f.name for f in fields(SamplingParams)}


def make_sampling_params(api_names: dict[str, str] | None = None, **kwargs) -> SamplingParams:
    """SamplingParams(**kwargs), its ValueError turned into a 400 naming the API parameter."""
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        # SamplingParams messages start with the field name ("top_k must be ...").
        first = str(e).split(" ", 1)[0].split("[", 1)[0]
        param = first if first in _SP_FIELDS else None
        if param and api_names:
            param = api_names.get(param, param)
        raise APIError(400, str(e), param, "invalid_value") from None


def check_limits(cfg: ServerConfig, n: int, logprobs: int | None, stop: list[str],
                 logprobs_name: str = "logprobs") -> None:
    """The operator's limits on n, logprobs and stop strings (cheap: nothing is allocated yet)."""
    if n > cfg.max_n:
        raise APIError(400, f"n must be <= {cfg.max_n}, got {n}", "n", "invalid_value")
    if logprobs is not None and logprobs > cfg.max_logprobs:
        raise APIError(400, f"{logprobs_name} must be <= {cfg.max_logprobs}, got {logprobs}",
                       logprobs_name, "invalid_value")
    if len(stop) > cfg.max_stop_strings:
        raise APIError(400, f"stop has {len(stop)} strings; at most {cfg.max_stop_strings} "
                       "are allowed", "stop", "invalid_value")
    for s in stop:
        if not s:
            raise APIError(400, "stop strings must not be empty", "stop", "invalid_value")
        if len(s) > cfg.max_stop_length:
            raise APIError(400, f"stop strings must be at most {cfg.max_stop_length} "
                           "characters long", "stop", "invalid_value")


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _common(req: _SamplingFields, stop: list[str]) -> dict:
    """SamplingParams keyword arguments shared by completions and chat."""
    kw = dict(n=req.n, stop=stop, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
              skip_special_tokens=req.skip_special_tokens,
              include_stop_str_in_output=req.include_stop_str_in_output)
    constraint = structured_output_of(req)
    if constraint is not None:
        kw["structured_output"] = constraint
    for name in ("temperature", "top_p", "min_p", "seed", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "stop_token_ids", "logit_bias"):
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    if req.top_k is not None:
        kw["top_k"] = req.top_k
    return kw


def _check_stream_options(req: _SamplingFields) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true",
                       "stream_options", "invalid_value")


def completion_params(req: CompletionRequest, cfg: ServerConfig) -> SamplingParams:
    """SamplingParams of a /v1/completions request."""
    stop = _stop_list(req.stop)
    check_limits(cfg, req.n, req.logprobs, stop)
    _check_stream_options(req)
    if req.suffix:
        raise APIError(400, "suffix is not supported", "suffix", "unsupported")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported (it must be equal to n)", "best_of",
                       "unsupported")
    kw = _common(req, stop)
    kw.update(max_tokens=req.max_tokens, logprobs=req.logprobs)
    if req.echo and req.logprobs is not None:  # the echoed prompt carries logprobs too
        kw["prompt_logprobs"] = req.logprobs
    return make_sampling_params(**kw)


def chat_params(req: ChatCompletionRequest, cfg: ServerConfig,
                tool_parser: ToolCallParser | None = None) -> SamplingParams:
    """SamplingParams of a /v1/chat/completions request (`tool_parser`: how its tool calls, if
    any, will be read)."""
    stop = _stop_list(req.stop)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs to be true", "top_logprobs",
                       "invalid_value")
    top = (req.top_logprobs or 0) if req.logprobs else None
    check_limits(cfg, req.n, top, stop, logprobs_name="top_logprobs")
    _check_stream_options(req)
    plan = plan_tools(req, tool_parser)
    if req.chat_template is not None and not cfg.allow_request_chat_template:
        raise APIError(400, "chat_template in a request is not allowed on this server (the "
                       "operator can enable it with --allow-request-chat-template)",
                       "chat_template", "chat_template_not_allowed")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    kw = _common(req, stop)
    kw.update(max_tokens=max_tokens, logprobs=top)
    if plan is not None and plan.forced:
        if "structured_output" in kw:
            raise APIError(400, "tool_choice required or a named function cannot be combined "
                           "with another output constraint", "tool_choice", "invalid_value")
        kw["structured_output"] = plan.constraint
    elif plan is not None and plan.parser.special_marker:
        kw["skip_special_tokens"] = False  # the call marker is a special token: keep it
    names = {"max_tokens": "max_completion_tokens" if req.max_completion_tokens is not None
             else "max_tokens", "logprobs": "top_logprobs"}
    return make_sampling_params(names, **kw)


def tgi_params(req: TGIRequest, cfg: ServerConfig) -> SamplingParams:
    """SamplingParams of a TGI /generate request (greedy unless do_sample)."""
    p = req.parameters
    check_limits(cfg, 1, None, p.stop)
    if p.best_of not in (None, 1):
        raise APIError(400, "best_of is not supported", "parameters.best_of", "unsupported")
    # TGI: sampling happens when do_sample is set or any sampling knob is given.
    sample = p.do_sample or p.temperature is not None or p.top_p is not None \
        or p.top_k is not None
    kw: dict = dict(max_tokens=p.max_new_tokens, stop=list(p.stop), seed=p.seed,
                    temperature=(p.temperature if p.temperature is not None else 1.0)
                    if sample else 0.0)
    if sample and p.top_p is not None:
        kw["top_p"] = p.top_p
    if sample and p.top_k is not None:
        kw["top_k"] = p.top_k
    if p.repetition_penalty is not None:
        kw["repetition_penalty"] = p.repetition_penalty
    if p.frequency_penalty is not None:
        kw["frequency_penalty"] = p.frequency_penalty
    if p.grammar is not None:
        kw["structured_output"] = tgi_grammar(p.grammar)
    names = {k: f"parameters.{k}" for k in ("max_tokens", "stop", "seed", "temperature",
                                             "top_p", "top_k", "repetition_penalty")}
    names["max_tokens"] = "parameters.max_new_tokens"
    return make_sampling_params(names, **kw)
