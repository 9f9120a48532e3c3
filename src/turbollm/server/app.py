"""The FastAPI app: routes, auth, CORS, metrics and error handlers around one AsyncLLMEngine."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from starlette.responses import JSONResponse, Response

from turbollm import __version__
from turbollm.engine.async_engine import AsyncLLMEngine, EngineState
from turbollm.server.auth import make_auth_dependency
from turbollm.server.config import ServerConfig
from turbollm.server.engine_client import EngineClient
from turbollm.server.errors import install_error_handlers
from turbollm.server.metrics import HTTPMetricsMiddleware, ServerMetrics
from turbollm.server.protocol import (ChatCompletionRequest, CompletionRequest, EmbeddingRequest,
                                      TGIRequest)
from turbollm.server.serving_chat import create_chat_completion
from turbollm.server.responses_input import ResponsesRequest
from turbollm.server.serving_lora import load_adapter, unload_adapter
from turbollm.server.serving_responses import create_response, delete_response, get_response
from turbollm.server.serving_completion import create_completion
from turbollm.server.serving_embeddings import create_embeddings
from turbollm.server.serving_tgi import generate, generate_stream

# Request models documented in the OpenAPI schema (bodies are parsed by hand, see
# request_body.py, so FastAPI does not see them on its own).
_BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
           "/v1/responses": ResponsesRequest, "/v1/embeddings": EmbeddingRequest,
           "/generate": TGIRequest, "/generate_stream": TGIRequest}


def _openapi(app: FastAPI) -> dict:
    """The OpenAPI schema with the hand-parsed request bodies filled in."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in _BODIES.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    app.openapi_schema = schema
    return schema


def build_app(engine: AsyncLLMEngine, cfg: ServerConfig, model_name: str) -> FastAPI:
    """The server app; its lifespan starts the engine thread and stops it on shutdown."""
    client = EngineClient(engine, cfg, model_name)
    metrics = ServerMetrics(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)
            client.close()

    # No /docs or /redoc (they pull scripts from a CDN); /openapi.json is a normal,
    # authenticated route below.
    app = FastAPI(title="turbollm", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.client = client
    app.state.metrics = metrics
    install_error_handlers(app)

    public = APIRouter()
    api = APIRouter(dependencies=[Depends(make_auth_dependency(cfg.api_key))])

    @public.get("/health")
    async def health() -> JSONResponse:
        """Alive (the process serves HTTP); 503 once the engine is broken."""
        if engine.state == EngineState.BROKEN:
            return JSONResponse({"status": "broken"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @public.get("/ready")
    async def ready() -> JSONResponse:
        """200 when taking work; 503 while loading, draining or broken. Open like /health:
        load balancers probe it without credentials, and it tells nothing but the state."""
        status = 200 if engine.state == EngineState.READY else 503
        return JSONResponse({"status": engine.state.value}, status_code=status)

    def model_card() -> dict:
        card = {"id": model_name, "object": "model", "created": client.created,
                "owned_by": "turbollm"}
        if engine.engine is not None:
            card["max_model_len"] = engine.engine.max_model_len
        return card

    @api.get("/v1/models")
    async def list_models() -> JSONResponse:
        """The served model and its LoRA adapters (OpenAI list format)."""
        return JSONResponse({"object": "list",
                             "data": [model_card()] + client.loras.cards(client.created)})

    @api.get("/v1/models/{model:path}")
    async def get_model(model: str) -> JSONResponse:
        """One model card, or 404."""
        client.check_model(model)
        if model != model_name:
            return JSONResponse(next(c for c in client.loras.cards(client.created)
                                     if c["id"] == model))
        return JSONResponse(model_card())

    @api.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        """Load a LoRA adapter at run time and serve it under its name (vLLM's route)."""
        return await load_adapter(request, client)

    @api.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        """Stop serving an adapter; its requests in flight finish with it."""
        return await unload_adapter(request, client)

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        """OpenAI completions."""
        return await create_completion(request, client)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions."""
        return await create_chat_completion(request, client)

    @api.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        """OpenAI embeddings (pooled final hidden states)."""
        return await create_embeddings(request, client)

    @api.post("/v1/responses")
    async def responses(request: Request) -> Response:
        """OpenAI Responses API (a chat turn; chained with previous_response_id)."""
        return await create_response(request, client)

    @api.get("/v1/responses/{response_id}")
    async def responses_get(response_id: str) -> JSONResponse:
        """A stored response."""
        return get_response(client, response_id)

    @api.delete("/v1/responses/{response_id}")
    async def responses_delete(response_id: str) -> JSONResponse:
        """Forget a stored response."""
        return delete_response(client, response_id)

    @api.post("/generate")
    async def tgi_generate(request: Request) -> Response:
        """TGI generate."""
        return await generate(request, client)

    @api.post("/generate_stream")
    async def tgi_generate_stream(request: Request) -> Response:
        """TGI streaming generate."""
        return await generate_stream(request, client)

    @api.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text format."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/openapi.json")
    async def openapi() -> JSONResponse:
        """The OpenAPI schema."""
        return JSONResponse(_openapi(app))

    app.include_router(public)
    app.include_router(api)
    if cfg.origins:
        app.add_middleware(CORSMiddleware, allow_origins=cfg.origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics)
    return app

