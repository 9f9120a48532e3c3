"""ServerConfig: the HTTP server's options (the `turbollm serve` flags are generated from it)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from turbollm.server.tool_parsers import TOOL_CALL_PARSERS
from turbollm.sizing import parse_memory_size


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class ServerConfig:
    """Network exposure, admission limits and per-request limits of the server."""

    host: str = field(default="127.0.0.1", metadata=_help(
        "address to bind; 0.0.0.0 exposes the server to the network"))
    port: int = field(default=8000, metadata=_help("TCP port (0 = any free port)"))
    api_key: str | None = field(default=None, metadata=_help(
        "require 'Authorization: Bearer <key>' on every route but /health and /ready; falls "
        "back to --api-key-file, then $TURBOLLM_API_KEY; no auth when none is set; an empty "
        "key is an error (an unset variable in a launch script must not turn auth off)"))
    api_key_file: str | None = field(default=None, metadata=_help(
        "read the API key from this file (its first line), e.g. a mounted secret"))
    allowed_origins: str | None = field(default=None, metadata=_help(
        "comma-separated CORS origins ('*' for any); no CORS headers when unset"))
    served_model_name: str | None = field(default=None, metadata=_help(
        "model name clients must send; the --model value when unset"))
    max_queued_requests: int = field(default=256, metadata=_help(
        "requests waiting for a batch slot before new ones get 429"))
    max_queue_delay: float = field(default=0.0, metadata=_help(
        "seconds: while the longest-waiting request has waited this long for a batch slot, new "
        "requests get 429 at once (load shedding: under overload the admitted ones keep a "
        "short time to first token instead of queueing for minutes); 0 = off"))
    shutdown_timeout: float = field(default=30.0, metadata=_help(
        "seconds in-flight requests get to finish after SIGTERM"))
    max_request_bytes: str = field(default="1MiB", metadata=_help(
        "largest request body accepted (413 above), e.g. '1MiB'"))
    allow_request_chat_template: bool = field(default=False, metadata=_help(
        "accept a chat_template field in chat requests (rendered in a sandbox)"))
    max_n: int = field(default=16, metadata=_help("largest n (completions per prompt)"))
    max_logprobs: int = field(default=20, metadata=_help("largest logprobs / top_logprobs"))
    max_stop_strings: int = field(default=16, metadata=_help("most stop strings per request"))
    max_stop_length: int = field(default=256, metadata=_help("longest stop string (characters)"))
    max_prompts: int = field(default=64, metadata=_help(
        "most sequences (prompts x n) in one /v1/completions request with a prompt list, and "
        "inputs in one /v1/embeddings request"))
    tool_call_parser: str = field(default="auto", metadata=_help(
        "how tool calls are read from answers: hermes, qwen, llama3_json, mistral, or auto "
        "(from the chat template)", choices=TOOL_CALL_PARSERS))
    embedding_pooling: str = field(default="mean", metadata=_help(
        "how /v1/embeddings pools the final hidden states: mean over the positions, or the "
        "last position's (what last-token embedding models expect); a request's `pooling` "
        "overrides it", choices=("mean", "last")))
    responses_store_size: int = field(default=1024, metadata=_help(
        "responses kept for previous_response_id and GET /v1/responses/{id} (least recently "
        "used dropped first; 0 = keep none)"))
    responses_store_ttl: float = field(default=3600.0, metadata=_help(
        "seconds a stored response is kept"))
    # --lora-modules name=path [name=path ...] (server/cli.py adds the flag: it takes a list)
    lora_modules: list[str] | None = field(default=None, metadata={"cli": False})
    lora_dir: str | None = field(default=None, metadata=_help(
        "directory that LoRA adapters loaded at run time (POST /v1/load_lora_adapter) must be "
        "inside; loading at run time is off when unset"))

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_queued_requests", "responses_store_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_n", "max_stop_strings", "max_stop_length", "max_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")
        if self.max_queue_delay < 0:
            raise ValueError(f"max_queue_delay must be >= 0, got {self.max_queue_delay}")
        if not self.responses_store_ttl > 0:
            raise ValueError(f"responses_store_ttl must be > 0, got {self.responses_store_ttl}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if self.max_request_bytes_int < 1:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {TOOL_CALL_PARSERS}, got "
                             f"{self.tool_call_parser!r}")
        if self.lora_dir is not None and not os.path.isdir(self.lora_dir):
            raise ValueError(f"lora_dir {self.lora_dir!r} is not a directory")

    @property
    def max_request_bytes_int(self) -> int:
        return parse_memory_size(self.max_request_bytes)

    @property
    def origins(self) -> list[str]:
        if not self.allowed_origins:
            return []
        return [o.strip() for o in self.allowed_origins.split(",") if o.strip()]
