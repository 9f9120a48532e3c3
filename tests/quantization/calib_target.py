"""The calibration target of a built LLM: its worker's model, scored through the engine (which
borrows KV blocks from its pool, so cached prefixes are never overwritten)."""
from types import SimpleNamespace


def calibration_target(llm):
    eng = llm.engine
    return SimpleNamespace(model=eng.executor.worker.model, tokenizer=eng.tokenizer,
                           max_model_len=eng.max_model_len, score_logits=eng.score_logits)
