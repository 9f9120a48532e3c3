"""LLM: the offline API — batch generate and chat through the continuous-batching engine."""
from __future__ import annotations

import itertools
from typing import Sequence

from turbollm.core.lora_request import LoRARequest
from turbollm.engine.llm_engine import LLMEngine
from turbollm.engine.outputs import RequestOutput
from turbollm.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """`LLM(model=..., dtype=..., device=...)`; every EngineConfig field is a keyword argument."""

    def __init__(self, model: str = "smollm2-135m", **kwargs):
        self.engine = LLMEngine.from_kwargs(model=model, **kwargs)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None
                 ) -> list[RequestOutput]:
        """Generate for one prompt or many (strings or token-id lists), in input order; with
        one adapter for all prompts or one per prompt (None: the base model)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError("sampling_params must be one object or one per prompt")
        # A bad schema or grammar raises here, before anything is queued (compiles are cached).
        for spec in {p.structured_output for p in params} - {None}:
            self.engine.constrained.validate(spec)
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError("lora_request must be one LoRARequest or one per prompt")
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, p, lora in zip(ids, prompts, params, loras):
                self.engine.add_request(rid, prompt, p, lora_request=lora)
        except BaseException:
            for rid in ids:  # a bad prompt or adapter queues none of this call's requests
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm if use_tqdm is not None else len(prompts) > 8)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool | None = None,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation or many, using the model's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, chat_template) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm)

    def score_logits(self, token_ids: list[int]):
        """Next-token logits at every position of a token sequence: [len, vocab] fp32."""
        return self.engine.score_logits(token_ids)

    def embed(self, prompts: str | list[int] | list[str | list[int]], pooling: str = "mean",
              normalize: bool = True) -> list[list[float]]:
        """Embeddings of prompts (text or token ids): the final hidden states pooled over the
        positions (`mean`) or at the `last` one, unit length when `normalize`."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        return [self.engine.embed(p if isinstance(p, list) else self.engine.encode_prompt(p),
                                  pooling, normalize) for p in prompts]

    def shutdown(self) -> None:
        """Stop the engine's worker processes (tensor/pipeline parallelism)."""
        self.engine.shutdown()

    def apply_chat_template(self, messages: list[dict], chat_template: str | None = None
                            ) -> list[int]:
        """Token ids of a conversation rendered with the chat template, ready for a reply."""
        from turbollm.chat import render_chat
        text = render_chat(self.tokenizer, messages, chat_template)
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="generate", unit="req")
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:  # leave the engine clean for the next call
                self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[rid] for rid in ids]
