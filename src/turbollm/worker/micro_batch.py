"""Pipeline micro-batches: one step's sequences cut into groups that flow through the stages
one after the other, so that stage s + 1 computes group i while stage s computes group i + 1.

Every rank cuts the same StepBatch the same way (a pure function of it), so the stages agree
on each group's shape without talking. Whether this pays depends on the step: a stage that is
bound by reading its weights (small decode batches) takes about as long for half the rows as
for all of them, so cutting costs time there; prefill-heavy steps gain. Off by default
(ParallelConfig.pipeline_micro_batches = 1); not measured yet (docs/distributed.md).
"""
from __future__ import annotations

from turbollm.core.batch import ModelRunnerOutput, SequenceWork


def split_micro_batches(seqs: list[SequenceWork], m: int) -> list[list[SequenceWork]]:
    """Up to m contiguous, non-empty groups of `seqs` with about equal token counts."""
    m = min(m, len(seqs))
    if m <= 1:
        return [seqs]
    total = sum(len(s.token_ids) for s in seqs)
    groups: list[list[SequenceWork]] = []
    cur: list[SequenceWork] = []
    acc = 0
    for i, s in enumerate(seqs):
        cur.append(s)
        acc += len(s.token_ids)
        groups_left = m - len(groups) - 1  # groups still to fill after `cur`
        seqs_left = len(seqs) - i - 1
        if groups_left and (acc * m >= total * (len(groups) + 1) or seqs_left == groups_left):
            groups.append(cur)
            cur = []
    groups.append(cur)
    return groups


def merge_outputs(groups: list[list[SequenceWork]], outs: list[ModelRunnerOutput]
                  ) -> ModelRunnerOutput:
    """One output for the whole step, in the sequences' order."""
    sampled, logprobs = [], []
    prompt = None
    if any(o.prompt_logprobs is not None for o in outs):
        prompt = []
    for g, o in zip(groups, outs):
        sampled += o.sampled_token_ids
        logprobs += o.logprobs
        if prompt is not None:
            prompt += o.prompt_logprobs if o.prompt_logprobs is not None else [None] * len(g)
    return ModelRunnerOutput(sampled, logprobs, prompt)
