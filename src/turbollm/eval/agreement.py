"""Agreement between two configurations of one model (e.g. fp32 vs int4).

Two views, because they fail differently: next-token distributions compared position by position
over the corpus (top-1 agreement, KL divergence: sensitive to small numeric drift), and greedy
continuations compared token by token (what a user sees: one early flip changes the whole rest).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from turbollm.eval.perplexity import ScoreFn, windows


@dataclass
class LogitAgreement:
    top1_agreement: float  # fraction of positions where both argmaxes are equal
    mean_kl: float  # mean over positions of KL(a || b), nats
    max_kl: float
    perplexity_a: float
    perplexity_b: float
    num_tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def logit_agreement(score_a: ScoreFn, score_b: ScoreFn, token_ids: list[int],
                    max_length: int = 512, stride: int | None = None,
                    progress: bool = False) -> LogitAgreement:
    """Compare a and b at every scored position of the perplexity windows (each token once)."""
    if len(token_ids) < 2:
        raise ValueError("agreement needs at least 2 tokens")
    stride = stride or max(1, max_length // 2)
    spans = list(windows(len(token_ids), max_length, stride))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(spans), desc="agreement", unit="window")
    same = n = 0
    kl_sum = nll_a = nll_b = 0.0
    kl_max = 0.0
    for begin, end, first in spans:
        rows = slice(first - begin - 1, end - begin - 1)
        la = torch.log_softmax(score_a(token_ids[begin:end])[rows].float().cpu(), -1)
        lb = torch.log_softmax(score_b(token_ids[begin:end])[rows].float().cpu(), -1)
        targets = torch.tensor(token_ids[first:end])
        same += int((la.argmax(-1) == lb.argmax(-1)).sum())
        kl = (la.exp() * (la - lb)).sum(-1).clamp_min(0)  # rounding can make it -1e-9
        kl_sum += float(kl.double().sum())
        kl_max = max(kl_max, float(kl.max()))
        nll_a -= float(la.gather(1, targets[:, None]).double().sum())
        nll_b -= float(lb.gather(1, targets[:, None]).double().sum())
        n += len(targets)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return LogitAgreement(same / n, kl_sum / n, kl_max, math.exp(nll_a / n), math.exp(nll_b / n),
                          n)


@dataclass
class GreedyAgreement:
    token_agreement: float  # identical tokens at the same position / all positions
    prefix_agreement: float  # mean (common prefix length / continuation length)
    exact_match: float  # fraction of prompts whose continuations are identical
    num_prompts: int
    num_tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def greedy_agreement(a: list[list[int]], b: list[list[int]]) -> GreedyAgreement:
    """Compare continuations prompt by prompt; a missing token (shorter output) is a mismatch."""
    if len(a) != len(b) or not a:
        raise ValueError("need the same, non-zero number of continuations on both sides")
    same = total = exact = 0
    prefix = 0.0
    for x, y in zip(a, b):
        length = max(len(x), len(y))
        if length == 0:
            exact += 1
            prefix += 1.0
            continue
        equal = [i < len(x) and i < len(y) and x[i] == y[i] for i in range(length)]
        same += sum(equal)
        total += length
        common = next((i for i, e in enumerate(equal) if not e), length)
        prefix += common / length
        exact += common == length
    return GreedyAgreement(same / total if total else 1.0, prefix / len(a), exact / len(a),
                           len(a), total)


def greedy_continuations(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy (temperature 0), fixed-length continuations of token-id prompts."""
    from turbollm.sampling_params import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]
