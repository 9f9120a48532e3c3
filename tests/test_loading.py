"""Model resolution and loading formats: dummy presets, HF dirs, Hub ids offline, bad names."""
import pytest

from turbollm import LLM, SamplingParams
from turbollm.loader.resolve import ModelNotFoundError, resolve_model


def test_dummy_weights_for_a_preset_shape():
    llm = LLM("llama-2-7b", load_format="dummy", dtype="float32", kv_cache_memory="64MiB",
              hf_config_overrides={"num_hidden_layers": 2})
    arch = llm.engine.arch
    assert (arch.hidden_size, arch.intermediate_size, arch.vocab_size) == (4096, 11008, 32000)
    assert llm.tokenizer is None
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=3, temperature=0,
                                                     ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3 and out[0].outputs[0].text == ""


def test_dummy_weights_for_an_hf_dir(tiny_llama):
    llm = LLM(str(tiny_llama), load_format="dummy", dtype="float32", kv_cache_memory="8MiB")
    w = llm.engine.executor.worker.model.model.layers[0].self_attn.qkv_proj.weight
    assert float(w.abs().max()) <= 1e-3  # random small values, not the checkpoint's


def test_hub_id_offline_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("some-org/some-model-that-is-not-cached")
    assert "\n" not in str(e.value) and "some-org/some-model" in str(e.value)


def test_unknown_path_is_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))


def test_bundled_name_resolves(bundled_gguf):
    r = resolve_model("smollm2-135m")
    assert r.kind == "gguf" and r.path == bundled_gguf


def test_cli_generate_prints_completion_and_speed(tiny_llama, capsys):
    from turbollm.cli import main
    rc = main(["generate", "--model", str(tiny_llama), "--prompt", "Hello", "--max-tokens", "5",
               "--ignore-eos", "--dtype", "float32", "--kv-cache-memory", "8MiB"])
    captured = capsys.readouterr()
    assert rc == 0 and "tok/s" in captured.err and captured.out.strip()


def test_cli_bad_model_is_one_line_error(capsys):
    from turbollm.cli import main
    rc = main(["generate", "--model", "/no/such/model.gguf", "--prompt", "x"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("turbollm generate: error:") and "\n" not in err
