"""The GPU decode bench's measurement and table, run on CPU engines (the CLI itself needs CUDA)."""
import pytest
import torch

from turbollm import LLM
from turbollm.bench import gpu_decode

SMALL = {"num_hidden_layers": 1, "hidden_size": 256, "intermediate_size": 512,
         "num_attention_heads": 4, "num_key_value_heads": 4}


def test_measure_and_report_every_format():
    llms = {f: LLM("llama-2-7b", load_format="dummy", device="cpu", dtype="bfloat16",
                   kv_cache_memory="64MiB", hf_config_overrides=SMALL, **gpu_decode.FORMATS[f])
            for f in ("bf16", "int4")}
    res = gpu_decode.measure(llms, rounds=1, batch=3, prompt_len=8, new_tokens=4)
    assert all(r["decode_tok_s"] > 0 and r["batch3_tok_s"] > 0 for r in res.values())
    assert res["int4"]["weight_bytes"]["linear"] < 0.3 * res["bf16"]["weight_bytes"]["linear"]
    table = gpu_decode.report(res, 3).splitlines()
    assert len(table) == 4 and table[2].startswith("| bf16 |") and "| 1.00 |" in table[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cli_refuses_without_cuda():
    with pytest.raises(SystemExit):
        gpu_decode.main(["--formats", "bf16"])
