"""What the offline bench runs: named request workloads and the quick / full presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace


@dataclass(frozen=True)
class Workload:
    """`requests` requests sent one after another (batch 1), greedy, fixed-length answers
    (ignore_eos), non-streaming; the first `shared_prefix` prompt tokens are common to all."""

    name: str
    prompt_tokens: int
    output_tokens: int
    requests: int = 1
    shared_prefix: int = 0

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1 or self.requests < 1:
            raise ValueError(f"workload {self.name}: lengths and requests must be >= 1")
        if not 0 <= self.shared_prefix < self.prompt_tokens:
            raise ValueError(f"workload {self.name}: shared_prefix must be < prompt_tokens")


WORKLOADS = {
    # The chatbot case: a 512-token conversation, a 313-token answer, end-to-end latency.
    "chatbot": Workload("chatbot", 512, 313, requests=2),
    "chat-short": Workload("chat-short", 512, 32),
    # Retrieval-style: one long shared context, short distinct questions (prefix caching).
    "rag": Workload("rag", 512, 16, requests=4, shared_prefix=448),
    "rag-short": Workload("rag-short", 512, 8, requests=3, shared_prefix=448),
    "long-answer": Workload("long-answer", 64, 512),
}


def parse_workload(text: str) -> Workload:
    """A preset name, or NAME:PROMPT:OUTPUT[:REQUESTS[:SHARED_PREFIX]]."""
    if text in WORKLOADS:
        return WORKLOADS[text]
    parts = text.split(":")
    if len(parts) < 3:
        raise ValueError(f"unknown workload {text!r}: use one of {', '.join(WORKLOADS)} or "
                         "NAME:PROMPT:OUTPUT[:REQUESTS[:SHARED_PREFIX]]")
    try:
        nums = [int(p) for p in parts[1:]]
    except ValueError:
        raise ValueError(f"workload {text!r}: lengths must be integers") from None
    return Workload(parts[0], *nums)


@dataclass
class BenchSpec:
    """Sizes of every measurement of one configuration."""

    prefill_tokens: int = 512
    prefill_reps: int = 1
    decode_prompt_tokens: int = 16
    decode_tokens: int = 16
    workloads: list[str] = field(default_factory=lambda: ["chat-short", "rag-short"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    batch_prompt_tokens: int = 64
    batch_output_tokens: int = 16
    ppl_tokens: int = 768
    ppl_max_length: int = 512
    ppl_stride: int = 256
    agree_prompts: int = 4
    agree_prompt_tokens: int = 16
    agree_tokens: int = 16

    def as_dict(self) -> dict:
        return asdict(self)

    def workload_list(self) -> list[Workload]:
        return [parse_workload(w) for w in self.workloads]

    def max_context(self) -> int:
        """Longest prompt + answer any measurement uses."""
        return max([self.prefill_tokens + 1, self.decode_prompt_tokens + self.decode_tokens + 1,
                    self.batch_prompt_tokens + self.batch_output_tokens,
                    self.ppl_max_length, self.agree_prompt_tokens + self.agree_tokens]
                   + [w.prompt_tokens + w.output_tokens for w in self.workload_list()])

    def kv_tokens(self) -> int:
        """KV slots the largest step needs (the batch sweep at its largest batch)."""
        return max(self.max_context(), max(self.batch_sizes) * (
            self.batch_prompt_tokens + self.batch_output_tokens),
                   self.agree_prompts * (self.agree_prompt_tokens + self.agree_tokens))

    def with_overrides(self, overrides: dict) -> "BenchSpec":
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown bench setting(s) {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(sorted(names))}")
        fixed = {}
        for k, v in overrides.items():
            if k in ("workloads",):
                fixed[k] = v.split("+") if isinstance(v, str) else list(v)
            elif k == "batch_sizes":
                fixed[k] = [int(x) for x in str(v).split("+")]
            else:
                fixed[k] = int(v)
        spec = replace(self, **fixed)
        spec.workload_list()  # validate now, not in the middle of a run
        return spec


PRESETS = {
    # ~15-20 s per configuration for the bundled 135M model on 2 idle cores: every column
    # filled, few repetitions (a smoke test of the matrix, not numbers to publish).
    "quick": BenchSpec(),
    "full": BenchSpec(prefill_reps=3, decode_tokens=128,
                      workloads=["chatbot", "rag", "long-answer"], batch_sizes=[1, 4, 16, 64],
                      batch_prompt_tokens=128, batch_output_tokens=128, ppl_tokens=16384,
                      agree_prompts=16, agree_prompt_tokens=64, agree_tokens=64),
}
