"""Reference adapters made with `peft`, and our logits computed under an adapter."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from turbollm import SamplingParams
from turbollm.core.batch import sequence_work
from turbollm.core.request import Request


def make_adapter(hf_model, out_dir: Path, r: int, targets: list[str], alpha: float = 16,
                 rslora: bool = False, seed: int = 0, scale: float = 1.0):
    """Save a PEFT LoRA adapter with random non-zero A and B for (a copy of) `hf_model`;
    return PEFT's merged model (the reference: W + scaling B A in every target)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                     init_lora_weights=False)  # False: B is random too, not zeros
    peft_model = get_peft_model(copy.deepcopy(hf_model), cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
                assert p.abs().min() >= 0 and p.abs().max() > 0
    peft_model.save_pretrained(str(out_dir))
    assert (Path(out_dir) / "adapter_model.safetensors").is_file()
    return peft_model.merge_and_unload().eval()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def our_logits(llm, token_ids: list[int], chunks: list[int], lora=None) -> torch.Tensor:
    """Logits at every position under `lora` (None: the base), the sequence computed in the
    given chunk sizes through the model runner's adapter slots, as ModelRunner.execute does."""
    engine = llm.engine
    worker = engine.executor.worker
    runner = worker.runner
    if lora is not None:
        engine.add_lora(lora)
    req = Request("probe", token_ids, SamplingParams(max_tokens=1), [], 1, lora_request=lora)
    rows = []
    try:
        for n in chunks:
            assert engine.kv_manager.allocate_slots(req, n)
            work = sequence_work(req, n, engine.kv_manager.block_ids("probe"))
            batch = runner.build_batch([work])
            slots = runner.lora.slots_for([work.lora])
            runner.lora.begin_step([(0, n, slots[0])])
            try:
                with torch.inference_mode():
                    h = worker.model(batch.input_ids, batch.positions, runner.kv_views,
                                     batch.meta)
                    rows.append(worker.model.compute_logits(h))
            finally:
                runner.lora.end_step()
            req.num_computed_tokens += n
    finally:
        engine.kv_manager.free(req)
    return torch.cat(rows)
