"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes and answers)."""
from __future__ import annotations

from fastapi import Request
from starlette.responses import PlainTextResponse, Response

from turbollm.server.engine_client import EngineClient, engine_error
from turbollm.server.errors import APIError
from turbollm.server.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from turbollm.server.request_body import read_request_model


async def load_adapter(request: Request, client: EngineClient) -> Response:
    """Check the path, read the adapter's files in a thread and install it on the engine
    thread (a bad adapter is a 400 that says why), then serve it by name."""
    body = await read_request_model(request, client.cfg.max_request_bytes_int,
                                    LoadLoRAAdapterRequest)
    loras = client.loras
    path = loras.check_runtime_path(body.lora_path)
    lora = loras.new_request(body.lora_name, path)  # 400 if the name is taken
    try:
        adapter = await client.engine.read_adapter(lora)  # (in a thread: streams go on)
        await client.engine.call(lambda engine: engine.add_lora(lora, adapter))
    except Exception as exc:
        raise engine_error(exc) from None
    loras.check_name(body.lora_name)  # still free after the await? (400 if not)
    loras.by_name[body.lora_name] = lora
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def unload_adapter(request: Request, client: EngineClient) -> Response:
    """Stop serving an adapter by name; the engine drops its weights once the requests that
    run it have finished."""
    body = await read_request_model(request, client.cfg.max_request_bytes_int,
                                    UnloadLoRAAdapterRequest)
    lora = client.loras.by_name.pop(body.lora_name, None)
    if lora is None:
        raise APIError(404, f"no LoRA adapter named {body.lora_name[:200]!r} is loaded",
                       "lora_name", "model_not_found")
    try:
        await client.engine.call(lambda engine: engine.remove_lora(lora.lora_int_id))
    except Exception as exc:
        raise engine_error(exc) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
