"""POST /v1/embeddings: the final hidden states of each input, pooled (mean over the positions
or the last position's) and scaled to unit length, as OpenAI's embeddings are.

Each input runs on the engine thread between decode steps (LLMEngine.embed, on KV blocks
borrowed for the call), one input per call, so a request with many inputs does not hold the
generating requests up for all of them at once.
"""
from __future__ import annotations

import base64
import struct

from starlette.requests import Request
from starlette.responses import JSONResponse

from turbollm.server.engine_client import EngineClient, engine_error
from turbollm.server.errors import APIError
from turbollm.server.protocol import EmbeddingRequest
from turbollm.server.request_body import read_request_model
from turbollm.server.serving_completion import prompt_list


def _encode(vec: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
    return vec


async def create_embeddings(request: Request, client: EngineClient) -> JSONResponse:
    """Handle /v1/embeddings."""
    req = await read_request_model(request, client.cfg.max_request_bytes_int, EmbeddingRequest)
    model = client.check_model(req.model)
    if client.loras.get(model) is not None:
        raise APIError(400, "embeddings come from the base model; a LoRA adapter cannot be "
                       "named here", "model", "unsupported")
    hidden = client.llm.arch.hidden_size
    if req.dimensions is not None and req.dimensions != hidden:
        # cutting a vector short is only meaningful for models trained for it (Matryoshka)
        raise APIError(400, f"dimensions must be the model's hidden size ({hidden}) or left "
                       "out", "dimensions", "invalid_value")
    inputs = prompt_list(req.input, client.cfg.max_prompts, param="input")
    pooling = req.pooling or client.cfg.embedding_pooling
    client.check_accepting()
    data, tokens = [], 0
    for i, item in enumerate(inputs):
        ids = item if isinstance(item, list) else await client.encode(item)
        try:
            vec = await client.engine.call(
                lambda engine, ids=ids: engine.embed(ids, pooling, req.normalize))
        except Exception as exc:
            err = engine_error(exc)
            if err.status == 400 and err.param == "prompt":
                err.param = "input"
            raise err from None
        tokens += len(ids)
        data.append({"object": "embedding", "index": i,
                     "embedding": _encode(vec, req.encoding_format)})
    return JSONResponse({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
