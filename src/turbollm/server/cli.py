"""`turbollm serve`: the OpenAI-compatible HTTP server on the engine."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from dataclasses import fields
from pathlib import Path

log = logging.getLogger(__name__)

API_KEY_ENV = "TURBOLLM_API_KEY"


SERVE_DESCRIPTION = ("OpenAI-compatible server (/v1/completions, /v1/chat/completions, "
                     "/v1/models, TGI /generate, /health, /ready, /metrics).")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Create the `serve` subcommand: engine flags plus server flags."""
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description=SERVE_DESCRIPTION)
    add_serve_args(p)
    p.set_defaults(func=run_serve)
    return p


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of `turbollm serve` (also `python -m turbollm.serve`, the torchrun entry)."""
    from turbollm.cli_args import add_dataclass_args, add_engine_args
    from turbollm.server.config import ServerConfig
    add_engine_args(p)
    add_dataclass_args(p, ServerConfig, "server")
    p.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH", default=None,
                   help="LoRA adapters (PEFT directories) served by name: a request whose "
                        "model is NAME runs that adapter (turns on --enable-lora)")


def server_config_from_args(args: argparse.Namespace):
    """ServerConfig from parsed flags. The API key comes from --api-key, else --api-key-file,
    else $TURBOLLM_API_KEY; one that is given but empty is an error, never "no auth"."""
    from turbollm.server.config import ServerConfig
    kw = {f.name: getattr(args, f.name) for f in fields(ServerConfig) if hasattr(args, f.name)}
    kw["api_key"] = resolve_api_key(kw.get("api_key"), kw.pop("api_key_file", None))
    return ServerConfig(**kw)


def resolve_api_key(flag: str | None, path: str | None) -> str | None:
    """The key from the flag, the file or the environment (in that order), stripped."""
    if flag is not None and path is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if flag is not None:
        source, key = "--api-key", flag
    elif path is not None:
        source = f"--api-key-file {path}"
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"cannot read {source}: {e.strerror}") from None
        key = lines[0] if lines else ""
    elif API_KEY_ENV in os.environ:
        source, key = f"${API_KEY_ENV}", os.environ[API_KEY_ENV]
    else:
        return None
    if not key.strip():
        raise ValueError(f"{source} is empty: refusing to serve without authentication by "
                         "accident (leave every key source unset to serve without one)")
    return key.strip()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_model_files(engine_config) -> None:
    """Read the model's header (GGUF metadata or config.json) before serving, so a missing or
    corrupt checkpoint is one line and exit 2 rather than a server that goes broken later."""
    from turbollm.loader.resolve import resolve_model
    from turbollm.worker.model_loader import read_arch
    mc = engine_config.model
    read_arch(resolve_model(mc.model, mc.load_format), mc.hf_config_overrides)


def _check_lora_modules(cfg, engine_config) -> None:
    """--lora-modules: well formed, each a PEFT directory we can serve (its config read now,
    the weights at the first request); turns on enable_lora."""
    from turbollm.loader.peft_adapter import read_adapter_config
    from turbollm.server.lora_adapters import parse_lora_modules
    modules = parse_lora_modules(cfg.lora_modules)
    for path in modules.values():
        read_adapter_config(Path(path))
    if modules or cfg.lora_dir is not None:
        engine_config.lora.enable_lora = True


def serve_engine_config(args: argparse.Namespace):
    """The EngineConfig of parsed serve flags (bad flags fail here, fast)."""
    from turbollm.cli_args import engine_kwargs
    from turbollm.config import EngineConfig
    return EngineConfig.from_kwargs(**engine_kwargs(args))


def run_serve(args: argparse.Namespace, launcher: str = "spawn") -> int:
    """Load the model in the background, serve until SIGTERM; the exit code (0 clean, 1 broken).
    launcher="torchrun": this process is rank 0 of a torchrun launch (turbollm/serve.py)."""
    from turbollm.engine.async_engine import AsyncLLMEngine
    from turbollm.server.app import build_app
    from turbollm.server.runner import make_server

    cfg = server_config_from_args(args)
    engine_config = serve_engine_config(args)
    engine_config.parallel.launcher = launcher
    _check_model_files(engine_config)
    _check_lora_modules(cfg, engine_config)
    model_name = cfg.served_model_name or engine_config.model.model
    if not _is_loopback(cfg.host) and cfg.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this address "
                    "can use the model (set --api-key or %s)", cfg.host, API_KEY_ENV)

    def load():
        from turbollm.engine.llm_engine import LLMEngine
        return LLMEngine(engine_config)

    engine = AsyncLLMEngine(load, max_queued_requests=cfg.max_queued_requests,
                            max_queue_delay=cfg.max_queue_delay)
    app = build_app(engine, cfg, model_name)
    server = make_server(app, engine, cfg.host, cfg.port, cfg.shutdown_timeout,
                         log_level=logging.getLevelName(logging.getLogger().level))
    log.info("serving %s on http://%s:%d (the model loads in the background; GET /ready)",
             model_name, cfg.host, cfg.port)
    server.run()
    if engine.fatal_error is not None:
        log.error("exiting: the engine failed: %s", engine.fatal_error)
    return server.exit_code
