"""`turbollm serve`: the OpenAI-compatible HTTP server on the engine."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from dataclasses import fields

log = logging.getLogger(__name__)

API_KEY_ENV = "TURBOLLM_API_KEY"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Create the `serve` subcommand: engine flags plus server flags."""
    from turbollm.cli_args import add_dataclass_args, add_engine_args
    from turbollm.server.config import ServerConfig
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible server (/v1/completions, /v1/chat/completions, "
                    "/v1/models, TGI /generate, /health, /ready, /metrics).")
    add_engine_args(p)
    add_dataclass_args(p, ServerConfig, "server")
    p.set_defaults(func=run_serve)
    return p


def server_config_from_args(args: argparse.Namespace):
    """ServerConfig from parsed flags; the API key falls back to $TURBOLLM_API_KEY."""
    from turbollm.server.config import ServerConfig
    kw = {f.name: getattr(args, f.name) for f in fields(ServerConfig) if hasattr(args, f.name)}
    if not kw.get("api_key"):
        kw["api_key"] = os.environ.get(API_KEY_ENV) or None
    return ServerConfig(**kw)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args: argparse.Namespace) -> int:
    """Load the model in the background, serve until SIGTERM; the exit code (0 clean, 1 broken)."""
    from turbollm.cli_args import engine_kwargs
    from turbollm.config import EngineConfig
    from turbollm.engine.async_engine import AsyncLLMEngine
    from turbollm.server.app import build_app
    from turbollm.server.runner import make_server

    cfg = server_config_from_args(args)
    engine_config = EngineConfig.from_kwargs(**engine_kwargs(args))  # bad flags fail here, fast
    model_name = cfg.served_model_name or engine_config.model.model
    if not _is_loopback(cfg.host) and cfg.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this address "
                    "can use the model (set --api-key or %s)", cfg.host, API_KEY_ENV)

    def load():
        from turbollm.engine.llm_engine import LLMEngine
        return LLMEngine(engine_config)

    engine = AsyncLLMEngine(load, max_queued_requests=cfg.max_queued_requests)
    app = build_app(engine, cfg, model_name)
    server = make_server(app, engine, cfg.host, cfg.port, cfg.shutdown_timeout,
                         log_level=logging.getLevelName(logging.getLogger().level))
    log.info("serving %s on http://%s:%d (the model loads in the background; GET /ready)",
             model_name, cfg.host, cfg.port)
    server.run()
    if engine.fatal_error is not None:
        log.error("exiting: the engine failed: %s", engine.fatal_error)
    return server.exit_code
