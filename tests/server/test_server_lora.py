"""LoRA adapters through the server: --lora-modules names, the official openai client selecting
an adapter by `model`, /v1/models, load/unload at run time (auth, allowed directory, in-flight
requests), TGI's adapter_id. On the tiny random Llama, with adapters made by `peft`."""
from __future__ import annotations

import asyncio
import copy
import json
import shutil

import httpx
import pytest
import torch

from conftest import MODEL_NAME, assert_error_shape, start_server
from turbollm import LLM, LoRARequest, SamplingParams
from turbollm.server.config import ServerConfig

PROMPT = "The quick brown fox"
GREEDY = dict(max_tokens=8, temperature=0)


def _make_adapter(model_dir, out_dir, r: int, seed: int) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"],
                     init_lora_weights=False)
    get_peft_model(copy.deepcopy(base), cfg).save_pretrained(str(out_dir))
    return str(out_dir)


@pytest.fixture(scope="module")
def lora_dir(tiny_llama, tmp_path_factory):
    """The directory runtime loads may read: adapters a (r 4) and b (r 8), and a DoRA one."""
    root = tmp_path_factory.mktemp("loras")
    _make_adapter(tiny_llama, root / "a", 4, 0)
    _make_adapter(tiny_llama, root / "b", 8, 1)
    shutil.copytree(root / "a", root / "dora")
    cfg = json.loads((root / "dora" / "adapter_config.json").read_text())
    (root / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    return root


@pytest.fixture(scope="module")
def offline(tiny_llama, lora_dir):
    """Greedy texts of PROMPT offline: base, adapter a, adapter b."""
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory="8MiB", enable_lora=True)
    sp = SamplingParams(**GREEDY)
    loras = [None, LoRARequest("a", 1, str(lora_dir / "a")), LoRARequest("b", 2, str(lora_dir / "b"))]
    texts = [o.outputs[0].text for o in llm.generate([PROMPT] * 3, sp, lora_request=loras)]
    assert len(set(texts)) == 3  # the adapters change the greedy text
    return dict(zip(["base", "a", "b"], texts))


@pytest.fixture(scope="module")
def lora_server(tiny_llama, lora_dir):
    cfg = ServerConfig(port=0, api_key="sekrit", lora_modules=[f"a={lora_dir / 'a'}"],
                       lora_dir=str(lora_dir))
    live = start_server(tiny_llama, cfg, enable_lora=True, max_loras=2)
    yield live
    live.stop()


def _auth(key="sekrit"):
    return {"Authorization": f"Bearer {key}"}


def test_openai_client_selects_adapter_by_model_name(lora_server, offline):
    import openai
    client = openai.OpenAI(base_url=lora_server.base_url + "/v1", api_key="sekrit")
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {MODEL_NAME, "a"}
    assert models["a"].model_extra["parent"] == MODEL_NAME
    for name, want in (("a", offline["a"]), (MODEL_NAME, offline["base"])):
        out = client.completions.create(model=name, prompt=PROMPT, **GREEDY)
        assert out.model == name and out.choices[0].text == want
    chat = client.chat.completions.create(model="a", max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.model == "a" and chat.choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    lora_server.wait_idle()
    metrics = httpx.get(lora_server.base_url + "/metrics", headers=_auth()).text
    line = next(x for x in metrics.splitlines()
                if x.startswith('turbollm_lora_requests_finished_total{adapter="a"}'))
    assert float(line.split()[-1]) >= 2  # the completion and the chat


def test_load_use_unload_at_run_time(lora_server, lora_dir, offline):
    url = lora_server.base_url
    r = httpx.post(url + "/v1/load_lora_adapter",
                   json={"lora_name": "b", "lora_path": str(lora_dir / "b")})
    assert r.status_code == 401  # the API key protects it like every route
    r = httpx.post(url + "/v1/load_lora_adapter", headers=_auth(),
                   json={"lora_name": "b", "lora_path": str(lora_dir / "b")})
    assert r.status_code == 200, r.text
    out = httpx.post(url + "/v1/completions", headers=_auth(),
                     json={"model": "b", "prompt": PROMPT, **GREEDY}).json()
    assert out["choices"][0]["text"] == offline["b"]
    again = httpx.post(url + "/v1/load_lora_adapter", headers=_auth(),
                       json={"lora_name": "b", "lora_path": str(lora_dir / "b")})
    assert_error_shape(again, 400, param="lora_name")
    tgi = httpx.post(url + "/generate", headers=_auth(), json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 8, "adapter_id": "b"}}).json()
    assert tgi["generated_text"] == offline["b"]
    r = httpx.post(url + "/v1/unload_lora_adapter", headers=_auth(), json={"lora_name": "b"})
    assert r.status_code == 200, r.text
    gone = httpx.post(url + "/v1/completions", headers=_auth(),
                      json={"model": "b", "prompt": PROMPT, "max_tokens": 2})
    assert_error_shape(gone, 404, code="model_not_found")
    assert_error_shape(httpx.post(url + "/v1/unload_lora_adapter", headers=_auth(),
                                  json={"lora_name": "b"}), 404)
    lora_server.wait_idle()
    assert lora_server.llm_engine.executor.worker.lora.loaded_ids() == [1]  # only a is left


def test_runtime_load_refusals(lora_server, lora_dir, tmp_path):
    url = lora_server.base_url
    outside = tmp_path / "outside"
    shutil.copytree(lora_dir / "a", outside)
    err = assert_error_shape(httpx.post(url + "/v1/load_lora_adapter", headers=_auth(), json={
        "lora_name": "x", "lora_path": str(outside)}), 400, param="lora_path")
    assert "--lora-dir" in err["message"]
    sneaky = str(lora_dir / ".." / outside.parent.name / "outside")  # .. out of the directory
    assert_error_shape(httpx.post(url + "/v1/load_lora_adapter", headers=_auth(), json={
        "lora_name": "x", "lora_path": sneaky}), 400, param="lora_path")
    err = assert_error_shape(httpx.post(url + "/v1/load_lora_adapter", headers=_auth(), json={
        "lora_name": "x", "lora_path": str(lora_dir / "dora")}), 400)
    assert "DoRA" in err["message"] and "\n" not in err["message"]
    assert_error_shape(httpx.post(url + "/v1/load_lora_adapter", headers=_auth(), json={
        "lora_name": MODEL_NAME, "lora_path": str(lora_dir / "b")}), 400, param="lora_name")
    names = [m["id"] for m in httpx.get(url + "/v1/models", headers=_auth()).json()["data"]]
    assert "x" not in names


def test_unload_with_requests_in_flight_loses_none(lora_server, lora_dir):
    """Streams running adapter c while it is unloaded all finish with every token."""
    url = lora_server.base_url
    manager = lora_server.llm_engine.executor.worker.lora
    lora_server.wait_idle()
    before = set(manager.loaded_ids())
    r = httpx.post(url + "/v1/load_lora_adapter", headers=_auth(),
                   json={"lora_name": "c", "lora_path": str(lora_dir / "b")})
    assert r.status_code == 200, r.text
    (c_id,) = set(manager.loaded_ids()) - before

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=url, headers=_auth(), timeout=60) as client:
            async def one(i: int) -> int:
                body = {"model": "c", "prompt": f"{PROMPT} {i}", "max_tokens": 24,
                        "temperature": 0, "ignore_eos": True}
                out = (await client.post("/v1/completions", json=body)).json()
                return out["usage"]["completion_tokens"]
            tasks = [asyncio.create_task(one(i)) for i in range(6)]
            await asyncio.sleep(0.3)
            unload = await client.post("/v1/unload_lora_adapter", json={"lora_name": "c"})
            assert unload.status_code == 200
            return await asyncio.gather(*tasks)

    assert asyncio.run(run()) == [24] * 6
    lora_server.wait_idle()
    lora_server.assert_no_blocks_held()
    assert c_id not in manager.loaded_ids()  # dropped once its last request finished


def test_adapter_files_are_never_read_on_the_engine_thread(tiny_llama, lora_dir, offline,
                                                           monkeypatch):
    """A run-time load, and a request naming an adapter the memory LRU dropped, read the files
    in a thread beside the engine's: a read on its thread would stall every running stream."""
    import threading

    from turbollm.engine import llm_engine as engine_module
    from turbollm.worker import lora_manager
    readers = []

    def recording(read):
        def wrapper(*args, **kwargs):
            readers.append(threading.current_thread().name)
            return read(*args, **kwargs)
        return wrapper
    for module in (engine_module, lora_manager):
        monkeypatch.setattr(module, "load_peft_adapter", recording(module.load_peft_adapter))
    cfg = ServerConfig(port=0, lora_modules=[f"a={lora_dir / 'a'}"], lora_dir=str(lora_dir))
    live = start_server(tiny_llama, cfg, enable_lora=True, max_loras=1, max_cpu_loras=1)
    try:
        startup = len(readers)  # a, before serving: no stream to stall yet
        r = httpx.post(live.base_url + "/v1/load_lora_adapter",
                       json={"lora_name": "b", "lora_path": str(lora_dir / "b")})
        assert r.status_code == 200, r.text
        for name in ("b", "a", "b"):  # one slot, one adapter in memory: each evicts the other
            out = httpx.post(live.base_url + "/v1/completions",
                             json={"model": name, "prompt": PROMPT, **GREEDY}).json()
            assert out["choices"][0]["text"] == offline[name]
        live.wait_idle()
        assert len(readers) - startup >= 2  # the run-time load, and a after b evicted it
        assert "turbollm-engine" not in readers[startup:], readers
    finally:
        live.stop()
