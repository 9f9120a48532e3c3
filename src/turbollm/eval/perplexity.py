"""Sliding-window perplexity: every token after the first is scored exactly once, with as much
left context as the window allows (windows start every `stride` tokens)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

ScoreFn = Callable[[list[int]], torch.Tensor]  # token ids -> next-token logits [len, vocab]


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per scored token
    num_tokens: int  # tokens scored
    max_length: int
    stride: int


def windows(num_tokens: int, max_length: int, stride: int):
    """(begin, end, first scored token) of each window: each scores the next `stride` tokens
    with the `max_length - stride` or more tokens before them as context."""
    if max_length < 2 or not 1 <= stride < max_length:
        raise ValueError(f"need max_length >= 2 and 1 <= stride < max_length, "
                         f"got {max_length}, {stride}")
    first = 1  # token 0 has no prediction
    while first < num_tokens:
        end = min(first + stride, num_tokens) if first > 1 else min(max_length, num_tokens)
        yield max(0, end - max_length), end, first
        first = end


def token_nlls(score: ScoreFn, token_ids: list[int], max_length: int, stride: int,
               progress: bool = False) -> torch.Tensor:
    """Negative log-likelihood (nats) of tokens 1..n-1, each from one window: [n - 1]."""
    spans = list(windows(len(token_ids), max_length, stride))
    nlls = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(spans), desc="perplexity", unit="window")
    for begin, end, first in spans:
        logits = score(token_ids[begin:end])  # row i predicts token begin + i + 1
        rows = logits[first - begin - 1:end - begin - 1].float()
        targets = torch.tensor(token_ids[first:end], device=rows.device)
        nlls.append(torch.nn.functional.cross_entropy(rows, targets, reduction="none").cpu())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return torch.cat(nlls) if nlls else torch.empty(0)


def perplexity(score: ScoreFn, token_ids: list[int], max_length: int = 512,
               stride: int | None = None, progress: bool = False) -> PerplexityResult:
    """exp(mean NLL) over the sequence; stride defaults to half the window."""
    if len(token_ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    stride = stride or max(1, max_length // 2)
    nll = token_nlls(score, token_ids, max_length, stride, progress)
    mean = float(nll.double().mean())
    return PerplexityResult(math.exp(mean), mean, int(nll.numel()), max_length, stride)
